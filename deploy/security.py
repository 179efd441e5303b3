"""Transport security, an explicit choice of flower-server's user: :func:`choose_security`
checks the ``--insecure`` and TLS flags (for its own SuperLink, or an existing one named by
``--superlink``) and returns a :class:`Security`, which gives the SuperLink's flags, the
connection's entries in ``FLWR_HOME/config.toml`` and the SSL context of the health check."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from otfusion.deploy.errors import DeploymentError


@dataclass(frozen=True)
class Security:
    """Transport security of the SuperLink and of flower-server's connection to it."""

    insecure: bool
    ssl_ca_certfile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    root_certificates: Path | None = None
    enable_supernode_auth: bool = False

    def superlink_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        args = ["--ssl-ca-certfile", str(self.ssl_ca_certfile),
                "--ssl-certfile", str(self.ssl_certfile),
                "--ssl-keyfile", str(self.ssl_keyfile)]
        if self.enable_supernode_auth:
            args.append("--enable-supernode-auth")
        return args

    def connection(self, address: str) -> dict[str, object]:
        """The connection's entries in ``FLWR_HOME/config.toml``."""
        if self.insecure:
            return {"address": address, "insecure": True}
        return {"address": address, "root-certificates": str(self.root_certificates)}

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the health check of our own SuperLink: verify the chain against the CA;
        the host name is not checked because we may reach it through 127.0.0.1."""
        if self.insecure:
            return None
        context = ssl.create_default_context(cafile=str(self.root_certificates))
        context.check_hostname = False
        return context


def _existing_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DeploymentError(f"{flag} {path}: no such file")
    return resolved


def choose_security(*, insecure: bool = False, ssl_ca_certfile: str | None = None,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                    root_certificates: str | None = None, enable_supernode_auth: bool = False,
                    own_superlink: bool = True) -> Security:
    """Security must be an explicit choice: ``--insecure``, or TLS.

    With its own SuperLink, TLS means the three ``--ssl-*`` files (the connection then
    trusts ``--ssl-ca-certfile``, or ``--root-certificates`` if given). With an existing
    SuperLink (``--superlink``), TLS means the CA that signed its certificate:
    ``--root-certificates`` (``--ssl-ca-certfile`` is accepted as the same thing).
    """
    server_files = {"--ssl-certfile": ssl_certfile, "--ssl-keyfile": ssl_keyfile}
    tls_flags = {"--ssl-ca-certfile": ssl_ca_certfile, "--root-certificates": root_certificates,
                 **server_files}
    given_tls = [flag for flag, value in tls_flags.items() if value is not None]
    if insecure:
        if given_tls:
            raise DeploymentError(f"--insecure cannot be combined with {', '.join(given_tls)}: "
                                  "choose either an insecure or a TLS connection")
        if enable_supernode_auth:
            raise DeploymentError("--enable-supernode-auth needs TLS (Flower refuses it "
                                  "with --insecure)")
        return Security(insecure=True)
    if not given_tls:
        if own_superlink:
            hint = ("--insecure (plain HTTP: only on a trusted network) or TLS with "
                    "--ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY")
        else:
            hint = ("--insecure (plain HTTP) or --root-certificates CA (the CA that signed "
                    "the SuperLink's certificate)")
        raise DeploymentError(f"choose the transport security explicitly: {hint}")
    if own_superlink:
        missing = [flag for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
                   if tls_flags[flag] is None]
        if missing:
            raise DeploymentError(f"TLS for the SuperLink needs {', '.join(missing)} as well")
        ca = _existing_file(ssl_ca_certfile, "--ssl-ca-certfile")
        return Security(
            insecure=False,
            ssl_ca_certfile=ca,
            ssl_certfile=_existing_file(ssl_certfile, "--ssl-certfile"),
            ssl_keyfile=_existing_file(ssl_keyfile, "--ssl-keyfile"),
            root_certificates=_existing_file(root_certificates, "--root-certificates") or ca,
            enable_supernode_auth=enable_supernode_auth,
        )
    wrong = [flag for flag, value in server_files.items() if value is not None]
    if wrong:
        raise DeploymentError(f"{', '.join(wrong)} configure the SuperLink that flower-server "
                              "starts; with --superlink give only --root-certificates CA")
    if enable_supernode_auth:
        raise DeploymentError("--enable-supernode-auth is a setting of the SuperLink: start "
                              "that SuperLink with it (not possible with --superlink)")
    if ssl_ca_certfile and root_certificates and (
            Path(ssl_ca_certfile).resolve() != Path(root_certificates).resolve()):
        raise DeploymentError("--ssl-ca-certfile and --root-certificates name different files; "
                              "with --superlink give only --root-certificates")
    ca = _existing_file(root_certificates or ssl_ca_certfile, "--root-certificates")
    return Security(insecure=False, root_certificates=ca)
