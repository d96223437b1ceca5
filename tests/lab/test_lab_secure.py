"""The lab is secure by default: the API wants a token, etcd wants a user, and an agent's
etcd user may write only its own host's keys."""

from __future__ import annotations

import os
import subprocess
import sys

from hvplace.lab import daemons, secure, workload
from hvplace.lab.control import Lab
from hvplace.lab.state import LabSettings
from hvplace.proto import keyspace


def _etcdctl(state_url: str, ca: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    return subprocess.run(
        ["etcdctl", f"--endpoints={state_url}", f"--cacert={ca}", "--dial-timeout=2s", *args],
        capture_output=True, text=True, timeout=30, env=dict(env, ETCDCTL_API="3"),
    )  # fmt: skip


def test_the_lab_refuses_callers_without_credentials(settings: LabSettings) -> None:
    lab = Lab(settings)
    try:
        lab.up(2, "test")
        state = lab.state()
        tls = secure.Secrets(state.secrets_dir)
        for private in (tls.root_password, tls.coordinator_password, tls.admin_token,
                        tls.agent_password("h1"), tls.etcd_key, tls.api_key):  # fmt: skip
            assert private.stat().st_mode & 0o077 == 0, private

        # With the lab's env the CLI works; without the token it is refused.
        assert "h1" in workload.hvplace(lab, "host", "list")
        env = dict(os.environ, **lab.env())
        del env["HVPLACE_TOKEN_FILE"]
        bare = subprocess.run(
            [sys.executable, "-m", "hvplace.cli", "host", "list"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert bare.returncode != 0 and "no credentials" in bare.stderr, bare.stderr

        url = daemons.live_etcd_urls(state)[0]
        anonymous = _etcdctl(url, str(tls.ca), "get", "--prefix", keyspace.ROOT)
        assert anonymous.returncode != 0, anonymous.stdout
        assert "user name is empty" in anonymous.stderr, anonymous.stderr

        h1 = f"agent-h1:{tls.agent_password('h1').read_text().strip()}"
        theirs = _etcdctl(url, str(tls.ca), f"--user={h1}", "put", keyspace.host("h2"), "{}")
        assert theirs.returncode != 0 and "permission denied" in theirs.stderr, theirs.stderr
        assert daemons.registered_hosts(state) == ["h1", "h2"]  # h2's key untouched
    finally:
        assert lab.down() == []
