"""A real etcd server for tests: Debian's `etcd` on free loopback ports, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "apt-get install -y etcd-server etcd-client"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if path is None:
        raise RuntimeError(f"the etcd binary is missing; install it with: {INSTALL_HINT}")
    return path


@dataclass(frozen=True)
class EtcdCerts:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> EtcdCerts:
    """With openssl: a CA, then server and client certificates it signs (EC keys, 1 day)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=hvplace-test-ca")  # fmt: skip
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=hvplace-test-{name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", str(ext))  # fmt: skip
    return EtcdCerts(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


class EtcdServer:
    """One etcd member with its own data dir; `kill()`/`start()` keep the data. Alone it
    is a one-member cluster; `EtcdCluster` makes several share an initial cluster."""

    def __init__(
        self, data_dir: Path | None = None, name: str = "hvplace-test", tls: EtcdCerts | None = None
    ) -> None:
        self._own_dir = data_dir is None
        self.tls = tls
        self.extra_args: list[str] = []
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="hvplace-etcd-"))
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.initial_cluster = f"{name}={self.peer_url}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "etcd.log"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def start(self, timeout: float = 15.0, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        peer = self.peer_url
        cmd = [
            etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir / "data"),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
            # hvplace commits a batch of VMs in one transaction (3 keys per VM); etcd's
            # default of 128 operations would cap a batch at 42 VMs. Production etcd
            # for hvplace runs with the same two settings (README).
            "--max-txn-ops",
            "4096",
            "--max-request-bytes",
            str(16 * 1024 * 1024),
            *self._tls_args(),
            *self.extra_args,
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait:
            self.wait_healthy(timeout)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1, context=self._ssl()) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.server_cert}",
            f"--key-file={self.tls.server_key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        ]

    def _ssl(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return context

    def wait_healthy(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    self.url + "/health", timeout=1, context=self._ssl()
                ) as r:
                    if b'"health":"true"' in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 by PID and reap; the data dir stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def etcdctl(self, *args: str) -> str:
        out = subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", *args],
            check=True,
            capture_output=True,
            env=dict(os.environ, ETCDCTL_API="3"),
            timeout=30,
        )
        return out.stdout.decode()


class EtcdCluster:
    """Several etcd members on loopback, each its own process and data dir, each
    killed and restarted by PID; `close()` stops every one and removes their dirs."""

    def __init__(self, size: int = 3, election_timeout_ms: int | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hvplace-etcd-cluster-"))
        self.members = [EtcdServer(self.base / f"m{i}", name=f"m{i}") for i in range(1, size + 1)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.data_dir.mkdir(parents=True, exist_ok=True)
            m.log_path = m.data_dir / "etcd.log"
            m.initial_cluster = initial
            if election_timeout_ms is not None:
                m.extra_args = [
                    f"--election-timeout={election_timeout_ms}",
                    f"--heartbeat-interval={max(10, election_timeout_ms // 10)}",
                ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        """Start every member, then wait (members wait for a quorum before they report
        healthy). A port taken between picking and binding it (other tests run beside
        these) restarts the whole first start on fresh ports."""
        for attempt in range(3):
            for m in self.members:
                m.start(wait=False)
            try:
                self._wait_healthy(timeout)
                return
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
            for m in self.members:
                m.stop()
                shutil.rmtree(m.data_dir / "data", ignore_errors=True)
                m.client_port, m.peer_port = free_port(), free_port()
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for m in self.members:
                m.initial_cluster = initial

    def _wait_healthy(self, timeout: float) -> None:
        """Until every member is healthy; at once when one has exited."""
        deadline = time.monotonic() + timeout
        waiting = list(self.members)
        while waiting:
            for m in waiting:
                assert m.proc is not None
                if m.proc.poll() is not None:
                    raise RuntimeError(f"{m.name} exited with {m.proc.returncode}: {m.log_tail()}")
            waiting = [m for m in waiting if not m.healthy()]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{waiting[0].name} not healthy in {timeout}s")
            time.sleep(0.05)

    def leader(self) -> EtcdServer:
        """The member raft elected, as the members report it."""
        import json

        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        leader_id = status[0]["Status"]["leader"]
        for s in status:
            if s["Status"]["header"]["member_id"] == leader_id:
                return self.member_on_port(int(s["Endpoint"].rsplit(":", 1)[1]))
        raise AssertionError(f"no member leads: {status}")

    def member_on_port(self, port: int) -> EtcdServer:
        return next(m for m in self.members if m.client_port == port)

    def etcdctl(self, *args: str) -> str:
        """etcdctl against every live member (it fails over itself)."""
        live = [m.url for m in self.members if m.proc is not None and m.proc.poll() is None]
        out = subprocess.run(
            ["etcdctl", f"--endpoints={','.join(live)}", *args],
            check=True,
            capture_output=True,
            env=dict(os.environ, ETCDCTL_API="3"),
            timeout=30,
        )
        return out.stdout.decode()

    def close(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def members_connected_from(cluster: EtcdCluster, pid: int | None = None) -> list[EtcdServer]:
    """The members process `pid` (this one by default) holds an established TCP
    connection to, on their client port: which member a client is using."""
    import psutil

    ports = {
        c.raddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.status == psutil.CONN_ESTABLISHED
    }
    return [m for m in cluster.members if m.client_port in ports]
