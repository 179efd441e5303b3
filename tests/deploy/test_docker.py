"""The Docker packaging in docker/, checked without a Docker engine.

The compose files and the Dockerfile are read as data and checked against this
environment: the Flower images are the installed flwr version, every command the
containers run is a console script of the installed Flower and every flag is one of its
flags (from its --help), the package's module paths resolve, ports and service names
line up (SuperNodes -> SuperLink, each SuperExec -> the Runtime API it serves), every
certificate or secret a TLS service names is mounted into it, nothing passes --insecure
there, and each client reads its own data directory. The checks are functions that
return a list of problems; mutated copies of the real files show that they catch
breakage. The certificate script runs for real and its certificates must pass a strict
TLS handshake under the names the services use.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path, PurePosixPath

import flwr
import pytest
import yaml
from flwr.common.config import parse_config_args
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = {"plain": DOCKER / "compose.yml", "tls": DOCKER / "compose-tls.yml"}
DOCKERFILE = DOCKER / "app.Dockerfile"
BIN = Path(sys.executable).parent
FLOWER_IMAGES = {  # Flower's official images and the command each one runs
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
FILE_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates",
              "--superexec-auth-secret-file", "--auth-supernode-private-key")
"""Flags whose value is a file inside the container (certificates, keys, secrets)."""

Compose = dict
Problems = list[str]


# --- reading the files ----------------------------------------------------------------

def load_compose(variant: str) -> Compose:
    return yaml.safe_load(COMPOSE[variant].read_text())


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def image_version(image: str) -> str:
    """The Flower version in a tag such as ``flwr/superexec:1.42.0`` (or ``1.42.0-py3.13-...``)."""
    tag = image.rpartition(":")[2]
    return tag.split("-")[0]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def option(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``)."""
    for index, token in enumerate(argv):
        if token == flag and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith(flag + "="):
            return token.partition("=")[2]
    return None


def entrypoint(service: dict) -> str:
    """The command a service's container runs (its command list is the arguments)."""
    if "build" in service:
        dockerfile = DOCKER / service["build"]["context"] / service["build"]["dockerfile"]
        return dockerfile_entrypoint(dockerfile.read_text()) if dockerfile.is_file() else ""
    return FLOWER_IMAGES.get(service["image"].rpartition(":")[0], "")


def dockerfile_entrypoint(text: str) -> str:
    entries = [args for keyword, args in dockerfile_instructions(text) if keyword == "ENTRYPOINT"]
    if not entries:
        return ""
    try:
        return json.loads(entries[-1])[0]  # exec form: ["command", ...]
    except ValueError:
        return entries[-1].split()[0]  # shell form


def services_running(compose: Compose, command: str) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items()
            if entrypoint(service) == command}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of a service's volumes (short syntax)."""
    found = []
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        found.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return found


def mounted_source(service: dict, path: str) -> str | None:
    """The host source that provides ``path`` inside the container, or None."""
    for source, target, _ in mounts(service):
        if PurePosixPath(path).is_relative_to(target):
            return source + path[len(target):]
    return None


# --- the installed Flower commands ------------------------------------------------------

_help_runs: dict[str, subprocess.Popen] = {}


def start_flower_help() -> None:
    """Start ``COMMAND --help`` of the Flower commands the containers run, in parallel
    and in the background (each one imports most of flwr: seconds of CPU)."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    for command in sorted(set(FLOWER_IMAGES.values())):
        if command not in _help_runs and (BIN / command).is_file():
            _help_runs[command] = subprocess.Popen(
                [str(BIN / command), "--help"], env=env, text=True, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@cache
def flower_options() -> dict[str, dict[str, tuple[bool, tuple[str, ...] | None, bool]]]:
    """For each Flower command the containers run: flag -> (takes a value, choices,
    required), from the ``--help`` of this environment's executables."""
    start_flower_help()
    return {command: parse_help(process.communicate(timeout=300)[0])
            for command, process in _help_runs.items()}


@pytest.fixture(scope="module", autouse=True)
def flower_help_in_background():
    """The --help runs start with this module's first test and overlap the others."""
    start_flower_help()
    yield
    for process in _help_runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def parse_help(text: str) -> dict[str, tuple[bool, tuple[str, ...] | None, bool]]:
    usage = text[text.index("usage:"):].split("\n\n")[0]
    required_part = usage
    while re.search(r"\[[^\[\]]*\]", required_part):
        required_part = re.sub(r"\[[^\[\]]*\]", "", required_part)
    required = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", required_part))
    found = {}
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if not match:
            continue
        for invocation in match.group(1).split(", "):
            flag, _, metavar = invocation.partition(" ")
            if not flag.startswith("--"):
                continue
            choices = (tuple(metavar.strip("{}").split(","))
                       if metavar.startswith("{") else None)
            found[flag] = (bool(metavar), choices, flag in required)
    return found


# --- checks: each returns a list of problems --------------------------------------------

def check_command(name: str, command: str, argv: list[str]) -> Problems:
    """``argv`` are valid arguments of the installed ``command``."""
    if not (BIN / command).is_file():
        return [f"{name}: runs {command!r}, which is not a console script of this environment"]
    options = flower_options()[command]
    problems, index = [], 0
    while index < len(argv):
        token = argv[index]
        flag, has_inline, inline = token.partition("=")
        if flag not in options:
            problems.append(f"{name}: {token!r} is not a flag of {command}")
            index += 1
            continue
        takes_value, choices, _ = options[flag]
        if takes_value and not has_inline:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                problems.append(f"{name}: {flag} of {command} needs a value")
                index += 1
                continue
            inline = argv[index + 1]
            index += 1
        elif not takes_value and has_inline:
            problems.append(f"{name}: {flag} of {command} takes no value")
        if choices and inline not in choices:
            problems.append(f"{name}: {flag} {inline!r} is not one of {choices}")
        index += 1
    for flag, (_, _, required) in options.items():
        if required and option(argv, flag) is None:
            problems.append(f"{name}: {command} requires {flag}")
    return problems


def check_commands(compose: Compose) -> Problems:
    problems = []
    for name, service in compose["services"].items():
        command = entrypoint(service)
        if not command:
            problems.append(f"{name}: no known entrypoint for image {service.get('image')!r}")
            continue
        problems += check_command(name, command, [str(arg) for arg in service["command"]])
    return problems


def check_images(compose: Compose) -> Problems:
    """Images are Flower's of the installed major.minor, builds point at real files."""
    installed = ".".join(flwr.__version__.split(".")[:2])
    problems = []
    for name, service in compose["services"].items():
        if "build" in service:
            context = DOCKER / service["build"]["context"]
            dockerfile = context / service["build"]["dockerfile"]
            if not context.is_dir() or not dockerfile.is_file():
                problems.append(f"{name}: build context {context} or Dockerfile {dockerfile} "
                                "does not exist")
        elif "image" not in service:
            problems.append(f"{name}: neither image nor build")
        else:
            repository, _, tag = service["image"].rpartition(":")
            if repository not in FLOWER_IMAGES:
                problems.append(f"{name}: {service['image']} is not one of Flower's images")
            elif not tag.startswith(installed + "."):
                problems.append(f"{name}: {service['image']} is not Flower {installed}.x "
                                f"(installed: {flwr.__version__})")
    return problems


def check_topology(compose: Compose) -> Problems:
    """Ports and names line up: SuperNodes -> SuperLink, one SuperExec per Runtime API."""
    problems = []
    services = compose["services"]
    superlinks = services_running(compose, "flower-superlink")
    supernodes = services_running(compose, "flower-supernode")
    superexecs = services_running(compose, "flower-superexec")
    if len(superlinks) != 1 or not supernodes:
        return [f"expected one SuperLink and some SuperNodes, got {sorted(superlinks)}, "
                f"{sorted(supernodes)}"]
    (link_name, link), = superlinks.items()
    link_argv = [str(arg) for arg in link["command"]]
    link_port = int(option(link_argv, "--port") or 0)
    if option(link_argv, "--host") != "0.0.0.0":
        problems.append(f"{link_name}: --host must be 0.0.0.0 to be reachable from the other "
                        "containers")
    published = [str(port).rpartition(":")[2] for port in link.get("ports", [])]
    if str(link_port) not in published:
        problems.append(f"{link_name}: listens on {link_port} but publishes {published}")
    if "--disable-runtime-dependency-installation" not in link_argv:
        problems.append(f"{link_name}: without --disable-runtime-dependency-installation")
    runtime_apis = {(link_name, link_port): link_name}
    for name, node in supernodes.items():
        argv = [str(arg) for arg in node["command"]]
        if option(argv, "--superlink") != f"{link_name}:{link_port}":
            problems.append(f"{name}: --superlink {option(argv, '--superlink')} is not "
                            f"{link_name}:{link_port}, where the SuperLink listens")
        if option(argv, "--host") != "0.0.0.0":
            problems.append(f"{name}: --host must be 0.0.0.0 for its SuperExec container")
        port = option(argv, "--port")
        if port is None:
            problems.append(f"{name}: no --port for its Runtime API")
        else:
            runtime_apis[(name, int(port))] = name
        if link_name not in node.get("depends_on", []):
            problems.append(f"{name}: does not depend on {link_name}")
    for name in [link_name, *supernodes]:
        argv = [str(arg) for arg in services[name]["command"]]
        if option(argv, "--isolation") != "process":
            problems.append(f"{name}: --isolation process expected (apps run in SuperExecs)")
    served: dict[str, list[str]] = {target: [] for target in runtime_apis.values()}
    for name, superexec in superexecs.items():
        argv = [str(arg) for arg in superexec["command"]]
        address = option(argv, "--runtime-api-address") or ":0"
        target = runtime_apis.get(split_address(address))
        if target is None:
            problems.append(f"{name}: --runtime-api-address {address} is no Runtime API of "
                            f"this stack ({sorted(runtime_apis)})")
            continue
        served[target].append(name)
        if target not in superexec.get("depends_on", []):
            problems.append(f"{name}: does not depend on {target}")
    for target, names in served.items():
        if len(names) != 1:
            problems.append(f"{target}: served by {len(names)} SuperExecs {names}, not one")
    for name, service in services.items():
        if "--allow-runtime-dependency-installation" in map(str, service["command"]):
            problems.append(f"{name}: installs dependencies at run time")
    return problems


def superexec_of(compose: Compose, node_name: str) -> tuple[str, dict] | None:
    for name, service in services_running(compose, "flower-superexec").items():
        address = option([str(arg) for arg in service["command"]], "--runtime-api-address")
        if address and split_address(address)[0] == node_name:
            return name, service
    return None


def check_data(compose: Compose) -> Problems:
    """Each SuperNode's data-path is mounted, read-only, from its own host directory into
    the SuperExec that runs its ClientApp (the process that opens the file)."""
    problems, sources = [], {}
    for name, node in services_running(compose, "flower-supernode").items():
        node_config = option([str(arg) for arg in node["command"]], "--node-config") or ""
        try:
            data_path = str(parse_config_args([node_config])["data-path"])
        except (KeyError, ValueError) as err:
            problems.append(f"{name}: --node-config {node_config!r} has no data-path ({err})")
            continue
        if not data_path.endswith(".npz"):
            problems.append(f"{name}: data-path {data_path!r} is not an .npz file")
            continue
        paired = superexec_of(compose, name)
        if paired is None:
            problems.append(f"{name}: no SuperExec runs its ClientApp")
            continue
        exec_name, superexec = paired
        source = mounted_source(superexec, data_path)
        if source is None:
            problems.append(f"{name}: data-path {data_path} is not mounted into {exec_name}")
            continue
        directory = str(PurePosixPath(source).parent)
        if not any(ro for src, _, ro in mounts(superexec) if source.startswith(src)):
            problems.append(f"{exec_name}: the data mount {directory} is not read-only")
        if directory in sources:
            problems.append(f"{name} and {sources[directory]} share the data directory "
                            f"{directory}")
        sources[directory] = name
    return problems


def check_security(compose: Compose, tls: bool) -> Problems:
    """TLS variant: TLS flags everywhere, no --insecure, every file a flag names is mounted
    (from ./certificates, never the CA key), and a SuperExec shares its Runtime API's
    secret. Plain variant: --insecure everywhere (TLS is Flower's default)."""
    problems = []
    services = compose["services"]
    for name, service in services.items():
        argv = [str(arg) for arg in service["command"]]
        command = entrypoint(service)
        if not tls:
            if "--insecure" not in argv:
                problems.append(f"{name}: neither --insecure nor TLS files")
            continue
        if "--insecure" in argv:
            problems.append(f"{name}: --insecure in the TLS variant")
        needed = {"flower-superlink": ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"),
                  "flower-supernode": ("--root-certificates",),
                  "flower-superexec": ("--root-certificates",)}.get(command, ())
        for flag in needed:
            if option(argv, flag) is None:
                problems.append(f"{name}: {flag} missing in the TLS variant")
        for flag in FILE_FLAGS:
            path = option(argv, flag)
            if path is None:
                continue
            source = mounted_source(service, path)
            if source is None:
                problems.append(f"{name}: {flag} {path} is not mounted into the container")
            elif not source.startswith("./certificates/"):
                problems.append(f"{name}: {flag} {path} comes from {source}, not ./certificates")
        for source, _, read_only in mounts(service):
            if source.startswith("./certificates") and not read_only:
                problems.append(f"{name}: {source} is mounted writable")
            if source.endswith("ca.key"):
                problems.append(f"{name}: the CA key is mounted into a container")
    if tls:
        for name, service in services_running(compose, "flower-superexec").items():
            argv = [str(arg) for arg in service["command"]]
            target = split_address(option(argv, "--runtime-api-address") or ":0")[0]
            if target not in services:
                continue
            target_argv = [str(arg) for arg in services[target]["command"]]
            mine = option(argv, "--superexec-auth-secret-file")
            theirs = option(target_argv, "--superexec-auth-secret-file")
            mine_source = mine and mounted_source(service, mine)
            theirs_source = theirs and mounted_source(services[target], theirs)
            if mine_source != theirs_source:
                problems.append(f"{name}: SuperExec secret {mine_source} differs from "
                                f"{target}'s {theirs_source}")
    return problems


def check_dockerfile(text: str, context: Path, ignore_text: str) -> Problems:
    """FROM Flower's SuperExec of the installed version, COPY sources exist and are not
    excluded from the build context, torch comes from the CPU index, the entrypoint is
    a console script here."""
    problems = []
    installed = ".".join(flwr.__version__.split(".")[:2])
    instructions = dockerfile_instructions(text)
    bases = [[word for word in args.split() if not word.startswith("--")][0]
             for keyword, args in instructions if keyword == "FROM"]
    for base in bases:
        repository = base.rpartition(":")[0]
        if repository not in FLOWER_IMAGES or not image_version(base).startswith(
                installed + "."):
            problems.append(f"FROM {base}: not Flower's image of version {installed}.x")
    included = {line[1:].strip().rstrip("/") for line in ignore_text.splitlines()
                if line.startswith("!")}
    excludes_all = any(line.strip() == "*" for line in ignore_text.splitlines())
    for keyword, args in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        if any(word.startswith("--from") for word in args.split()):
            continue  # from another build stage, not from the context
        words = [word for word in args.split() if not word.startswith("--")]
        for source in words[:-1]:
            if not (context / source).exists():
                problems.append(f"COPY {source}: no such path in the build context")
            elif excludes_all and source.rstrip("/") not in included:
                problems.append(f"COPY {source}: excluded by the .dockerignore")
    joined = re.sub(r"\\\n\s*", " ", text)
    pins = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    torch = re.search(r'"?torch==(\S+?)"?\s+--index-url https://download\.pytorch\.org/whl/cpu',
                      joined)
    version = torch and re.sub(r"\$\{(\w+)\}", lambda m: pins.get(m[1], ""), torch[1])
    if not version or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        problems.append("torch is not installed pinned from PyTorch's CPU index")
    elif version != importlib.metadata.version("torch").split("+")[0]:
        problems.append(f"torch {version} in the image, {importlib.metadata.version('torch')} "
                        "tested here")
    command = dockerfile_entrypoint(text)
    if not (BIN / command).is_file():
        problems.append(f"ENTRYPOINT {command!r} is not a console script of this environment")
    return problems


# --- the slower checks first (the --help runs go on meanwhile) -------------------------

def test_module_paths_resolve():
    """The app components (pyproject's, which the FAB that `flwr run` uploads carries) are
    module paths of the installed package, which is what the SuperExec image has; they and
    every otfusion module path named in docker/ resolve."""
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"]
    references = set(components.values())
    for path in DOCKER.iterdir():
        if path.is_file() and path.suffix in ("", ".yml", ".md", ".py", ".sh", ".Dockerfile"):
            references |= set(re.findall(r"\botfusion(?:\.\w+)+(?::\w+)?", path.read_text()))
    assert all(component.startswith("otfusion.") for component in components.values())
    for reference in sorted(references):
        module, _, attribute = reference.partition(":")
        imported = importlib.import_module(module)
        if attribute:
            assert hasattr(imported, attribute), reference


def test_demo_data_matches_the_mounts(tmp_path):
    """make_demo_data.py writes data/clientN/data.npz, the ClientApp loader reads it, and
    that is where the compose files mount client N's data from."""
    spec = importlib.util.spec_from_file_location("make_demo_data", DOCKER / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.write_demo_data(tmp_path, clients=3)
    from otfusion.task.data import load_npz

    for index, path in enumerate(paths, start=1):
        assert path == tmp_path / f"client{index}" / "data.npz"
        train, test = load_npz(str(path)), load_npz(str(path), "test")
        assert train.num_features == 64 and len(train) > len(test) > 0
    for variant in COMPOSE:
        compose = load_compose(variant)
        for index in (1, 2, 3):
            _, superexec = superexec_of(compose, f"supernode-{index}")
            node_argv = [str(arg) for arg in compose["services"][f"supernode-{index}"]["command"]]
            data_path = parse_config_args([option(node_argv, "--node-config")])["data-path"]
            assert mounted_source(superexec, data_path) == f"./data/client{index}/data.npz"
    assert "data/" in (DOCKER / ".gitignore").read_text().split()


def tls_handshake(cert: Path, key: Path, ca: Path, hostname: str) -> None:
    """A TLS handshake in memory: a server with cert/key, a client that trusts ca and
    checks hostname with strict X.509 verification (Python 3.13's default); raises
    ssl.SSLError on failure."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    pending = [client, server]
    for _ in range(20):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            return
    raise AssertionError("the TLS handshake did not finish")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("openssl and bash are needed to run generate_certificates.sh")
    out = tmp_path_factory.mktemp("certificates")
    subprocess.run(["bash", str(DOCKER / "generate_certificates.sh"), str(out), "3"],
                   check=True, capture_output=True, timeout=60,
                   env=dict(os.environ, SUPERLINK_SAN="DNS:fl.example.org"))
    return out


def test_generated_certificates_cover_the_tls_stack(certificates):
    compose = load_compose("tls")
    referenced = {source.removeprefix("./certificates/")
                  for service in compose["services"].values()
                  for source, _, _ in mounts(service) if source.startswith("./certificates/")}
    made = {path.name for path in certificates.iterdir()}
    assert referenced <= made, referenced - made
    assert made - referenced == {"ca.key"}
    for path in certificates.iterdir():
        private = path.suffix in (".key", ".secret")
        assert (path.stat().st_mode & 0o077 == 0) == private, path.name
    assert "certificates/" in (DOCKER / ".gitignore").read_text().split()


def test_generated_certificates_verify_under_the_names_in_use(certificates):
    """Each TLS server (SuperLink, every SuperNode's Runtime API) presents a certificate
    that its clients accept under the name they dial: the service name inside the
    compose network, 127.0.0.1 for the flwr CLI on the host, extra SUPERLINK_SAN names."""
    compose = load_compose("tls")
    services = compose["services"]
    ca = certificates / "ca.crt"
    checked = 0
    for service in services.values():
        argv = [str(arg) for arg in service["command"]]
        dialed = option(argv, "--superlink") or option(argv, "--runtime-api-address")
        if dialed is None:
            continue
        host = split_address(dialed)[0]
        server = services[host]
        server_argv = [str(arg) for arg in server["command"]]
        cert, key = (certificates / PurePosixPath(mounted_source(server, option(server_argv,
                                                                                flag))).name
                     for flag in ("--ssl-certfile", "--ssl-keyfile"))
        tls_handshake(cert, key, ca, host)
        checked += 1
    assert checked == len(services) - 1  # everyone but the SuperLink dials a server
    for host in ("127.0.0.1", "localhost", "fl.example.org"):
        tls_handshake(certificates / "superlink.crt", certificates / "superlink.key", ca, host)
    with pytest.raises(ssl.SSLCertVerificationError):  # names are really checked
        tls_handshake(certificates / "supernode-1.crt", certificates / "supernode-1.key", ca,
                      "supernode-2")


# --- the real files pass ----------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(COMPOSE))
def variant(request) -> str:
    return request.param


def test_compose_files_parse_and_have_the_expected_services(variant):
    compose = load_compose(variant)
    names = set(compose["services"])
    assert {"superlink", "superexec-serverapp"} <= names
    for index in (1, 2, 3):
        assert {f"supernode-{index}", f"superexec-clientapp-{index}"} <= names
    assert all(isinstance(service["command"], list) for service in compose["services"].values())


def test_images_and_builds(variant):
    assert check_images(load_compose(variant)) == []


def test_commands_and_flags_exist_in_installed_flower(variant):
    assert check_commands(load_compose(variant)) == []


def test_ports_and_names_are_consistent(variant):
    assert check_topology(load_compose(variant)) == []


def test_each_client_reads_its_own_data_directory(variant):
    assert check_data(load_compose(variant)) == []


def test_transport_security(variant):
    assert check_security(load_compose(variant), tls=variant == "tls") == []


def test_tls_variant_is_the_plain_stack_plus_tls():
    """The two files describe the same stack: same services, images, builds and
    non-security arguments (so a change to one is not forgotten in the other)."""
    def without_security(service: dict) -> dict:
        argv, kept, skip = [str(arg) for arg in service["command"]], [], False
        for token in argv:
            if skip:
                skip = False
            elif token in FILE_FLAGS:
                skip = True
            elif token != "--insecure":
                kept.append(token)
        volumes = [volume for volume in service.get("volumes", [])
                   if not volume.startswith("./certificates/")]
        return {**service, "command": kept, "volumes": volumes, "ports": None}

    plain, tls = load_compose("plain"), load_compose("tls")
    assert sorted(plain["services"]) == sorted(tls["services"])
    for name in plain["services"]:
        assert without_security(plain["services"][name]) == without_security(
            tls["services"][name]), name


def test_dockerfile():
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    assert ignore.is_file(), "the build context (the repository root) needs its ignore file"
    assert check_dockerfile(DOCKERFILE.read_text(), REPO, ignore.read_text()) == []


def test_flower_versions_agree_with_the_package_requirement():
    """Every Flower image tag in docker/ is one version, allowed by pyproject's flwr pin."""
    tags = set()
    for path in [*COMPOSE.values(), DOCKERFILE]:
        tags |= set(re.findall(r"flwr/(?:superlink|supernode|superexec):([\w.\-]+)",
                               path.read_text()))
    assert len(tags) == 1, tags
    version = image_version(tags.pop())
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "dependencies"]
    (flwr_requirement,) = [Requirement(dep) for dep in dependencies
                           if Requirement(dep).name == "flwr"]
    assert flwr_requirement.specifier.contains(version), (version, flwr_requirement)


# --- the checks catch broken files --------------------------------------------------------

def _set_option(service: dict, flag: str, value: str) -> None:
    argv = service["command"]
    argv[argv.index(flag) + 1] = value


def _broken(variant: str, change: Callable[[Compose], None]) -> Compose:
    compose = copy.deepcopy(load_compose(variant))
    change(compose["services"])
    return compose


BROKEN_COMPOSE = {
    "supernode dials the wrong port": (
        "plain", lambda s: _set_option(s["supernode-2"], "--superlink", "superlink:9092"),
        check_topology, "supernode-2"),
    "two superexecs for one supernode": (
        "plain", lambda s: _set_option(s["superexec-clientapp-3"], "--runtime-api-address",
                                       "supernode-1:9094"),
        check_topology, "supernode-3"),
    "superlink only on loopback": (
        "tls", lambda s: _set_option(s["superlink"], "--host", "127.0.0.1"),
        check_topology, "--host"),
    "runtime installs allowed": (
        "plain", lambda s: s["superlink"]["command"].remove(
            "--disable-runtime-dependency-installation"),
        check_topology, "disable-runtime-dependency-installation"),
    "insecure in the tls variant": (
        "tls", lambda s: s["superlink"]["command"].append("--insecure"),
        check_security, "--insecure"),
    "certificate not mounted": (
        "tls", lambda s: s["supernode-1"]["volumes"].pop(0),
        check_security, "supernode-1"),
    "secret of another runtime api": (
        "tls", lambda s: _set_option(s["superexec-serverapp"], "--superexec-auth-secret-file",
                                     "/app/certificates/ca.crt"),
        check_security, "superexec-serverapp"),
    "plain service without --insecure": (
        "plain", lambda s: s["supernode-3"]["command"].remove("--insecure"),
        check_security, "supernode-3"),
    "two clients share a data directory": (
        "plain", lambda s: s["superexec-clientapp-2"].update(
            volumes=["./data/client1:/app/data:ro"]),
        check_data, "share"),
    "data not mounted where data-path points": (
        "tls", lambda s: _set_option(s["supernode-1"], "--node-config",
                                     "data-path='/data/elsewhere.npz'"),
        check_data, "not mounted"),
    "removed superexec flag": (
        "plain", lambda s: s["superexec-serverapp"]["command"].extend(
            ["--plugin-type", "serverapp"]),
        check_commands, "--plugin-type"),
    "bad isolation choice": (
        "plain", lambda s: _set_option(s["supernode-1"], "--isolation", "container"),
        check_commands, "--isolation"),
    "superexec without runtime api address": (
        "plain", lambda s: s["superexec-serverapp"].update(command=["--insecure"]),
        check_commands, "requires --runtime-api-address"),
    "old flower image": (
        "plain", lambda s: s["supernode-2"].update(image="flwr/supernode:1.41.0"),
        check_images, "supernode-2"),
    "missing build context": (
        "plain", lambda s: s["superexec-serverapp"]["build"].update(context="../nowhere"),
        check_images, "superexec-serverapp"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_COMPOSE))
def test_checks_catch_a_broken_compose_file(case):
    variant, change, check, expected = BROKEN_COMPOSE[case]
    compose = _broken(variant, change)
    if check is check_security:
        problems = check(compose, tls=variant == "tls")
    else:
        problems = check(compose)
    assert problems, case
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.replace("flwr/superexec:1.42.0", "flwr/superexec:1.41.0"), "FROM"),
    (lambda t: t.replace("COPY --chown=app:app zoo", "COPY --chown=app:app zoo_missing"),
     "zoo_missing"),
    (lambda t: t.replace(" \\\n        --index-url https://download.pytorch.org/whl/cpu", ""),
     "torch"),
    (lambda t: t.replace('ENTRYPOINT ["flower-superexec"]', 'ENTRYPOINT ["flower-exec"]'),
     "ENTRYPOINT"),
])
def test_checks_catch_a_broken_dockerfile(change, expected):
    text = DOCKERFILE.read_text()
    broken = change(text)
    assert broken != text
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").read_text()
    problems = check_dockerfile(broken, REPO, ignore)
    assert any(expected in problem for problem in problems), problems


def test_dockerignore_must_let_copied_sources_through():
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").read_text()
    problems = check_dockerfile(DOCKERFILE.read_text(), REPO, ignore.replace("!server\n", ""))
    assert any("server" in problem and "dockerignore" in problem for problem in problems)
