"""Every etcd key hvplace uses, who writes it and which lease it rides on — in one place.

Values are the JSON of the records in `hvplace.proto.records` (readable with
`etcdctl get --prefix /hvplace/v1/`). Names are validated before they become keys.

| key                                         | record        | writer                | lease            |
|---------------------------------------------|---------------|-----------------------|------------------|
| /hvplace/v1/config                          | ClusterConfig | coordinator (fenced)  | none             |
| /hvplace/v1/election/<lease hex>            | leader id     | each coordinator      | its session      |
| /hvplace/v1/hosts/<host>                    | HostInfo      | that host's agent     | agent's lease    |
| /hvplace/v1/hoststatus/<host>               | HostStatus    | coordinator (fenced)  | none             |
| /hvplace/v1/vms/<scope>/<vm>                | VM            | coordinator (API)     | none             |
| /hvplace/v1/vmstatus/<scope>/<vm>           | VMStatus      | coordinator (fenced)  | none             |
| /hvplace/v1/assignments/<host>/<scope>/<vm> | Assignment    | coordinator (fenced)  | none             |
| /hvplace/v1/domains/<host>/<scope>/<vm>     | DomainStatus  | that host's agent     | agent's lease    |
| /hvplace/v1/migrations/<host>/<scope>/<vm>  | Migration     | coordinator (fenced)  | none             |
| /hvplace/v1/rules/<scope>/<rule>            | Rule          | coordinator (API)     | none             |
| /hvplace/v1/policies/<scope>                | ScopePolicy   | coordinator (API)     | none             |
| /hvplace/v1/requests/<request id>           | RequestRecord | coordinator (API)     | none             |
| /hvplace/v1/images/<image>                  | Image         | coordinator (API)     | none             |

An agent may write only `hosts/<its host>` and `domains/<its host>/` (the etcd role per
agent in SPEC §6) and read `assignments/<its host>/` and `config`. Only the API reads
`images/`: a VM's spec carries a copy of its catalogue image's files and digests. Assignments live
under the host so an agent watches only its own; a VM is moved by one transaction that
deletes the old key and puts the new one with a higher epoch.

A live migration in flight is one `Migration` record stored twice, under its source host
and under its target (written and deleted in one transaction), so that each agent reads
only `migrations/<its host>/`: the source runs the libvirt job, the target keeps the
incoming domain. The record's existence is the reservation on the target; its deletion
(with the assignment's move on success) ends the migration.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from hvplace.proto.names import check_name

ROOT = "/hvplace/v1/"
CONFIG = ROOT + "config"
ELECTION = ROOT + "election/"
HOSTS = ROOT + "hosts/"
HOST_STATUS = ROOT + "hoststatus/"
VMS = ROOT + "vms/"
VM_STATUS = ROOT + "vmstatus/"
ASSIGNMENTS = ROOT + "assignments/"
DOMAINS = ROOT + "domains/"
RULES = ROOT + "rules/"
POLICIES = ROOT + "policies/"
REQUESTS = ROOT + "requests/"
IMAGES = ROOT + "images/"
MIGRATIONS = ROOT + "migrations/"


def host(name: str) -> str:
    return HOSTS + check_name(name, "host name")


def host_status(name: str) -> str:
    return HOST_STATUS + check_name(name, "host name")


def vm(scope: str, name: str) -> str:
    return f"{VMS}{check_name(scope, 'scope')}/{check_name(name, 'VM name')}"


def vm_status(scope: str, name: str) -> str:
    return f"{VM_STATUS}{check_name(scope, 'scope')}/{check_name(name, 'VM name')}"


def assignments_of(host_name: str) -> str:
    """The prefix an agent watches: every assignment to its host."""
    return f"{ASSIGNMENTS}{check_name(host_name, 'host name')}/"


def assignment(host_name: str, scope: str, name: str) -> str:
    return f"{assignments_of(host_name)}{check_name(scope, 'scope')}/{check_name(name, 'VM name')}"


def domains_of(host_name: str) -> str:
    return f"{DOMAINS}{check_name(host_name, 'host name')}/"


def domain(host_name: str, scope: str, name: str) -> str:
    return f"{domains_of(host_name)}{check_name(scope, 'scope')}/{check_name(name, 'VM name')}"


def migrations_of(host_name: str) -> str:
    """The prefix an agent watches: migrations from or to its host."""
    return f"{MIGRATIONS}{check_name(host_name, 'host name')}/"


def migration(host_name: str, scope: str, name: str) -> str:
    return f"{migrations_of(host_name)}{check_name(scope, 'scope')}/{check_name(name, 'VM name')}"


def rule(scope: str, name: str) -> str:
    return f"{RULES}{check_name(scope, 'scope')}/{check_name(name, 'rule name')}"


def policy(scope: str) -> str:
    return POLICIES + check_name(scope, "scope")


def request(request_id: str) -> str:
    return REQUESTS + check_name(request_id, "request id")


def image(name: str) -> str:
    return IMAGES + check_name(name, "image name")


class Kind(StrEnum):
    """What a key holds: one per row of the table above, and `other` for the rest."""

    CONFIG = "config"
    ELECTION = "election"
    HOSTS = "hosts"
    HOST_STATUS = "host_status"
    VMS = "vms"
    VM_STATUS = "vm_status"
    ASSIGNMENTS = "assignments"
    DOMAINS = "domains"
    RULES = "rules"
    POLICIES = "policies"
    REQUESTS = "requests"
    IMAGES = "images"
    MIGRATIONS = "migrations"
    OTHER = "other"


class Key(NamedTuple):
    """A key taken apart. `id` is the record's name in its kind: a host's name, `scope/vm`
    (VMs, their statuses, assignments and domains), `scope/rule`, a policy's scope, an
    image's name, a request id, an election candidate's lease; the whole key for `other`.
    (A named tuple: the cache takes apart every key it is told of.)"""

    kind: Kind
    id: str
    host: str = ""
    scope: str = ""
    name: str = ""


_HOSTED, _IN_SCOPE, _NAMED_ONLY, _BY_SCOPE, _A_HOST = range(5)
# Each folder under ROOT (the key's first segment) and how the rest of the key reads.
_FOLDERS: dict[str, tuple[Kind, int]] = {
    prefix[len(ROOT) : -1]: (kind, shape)
    for prefix, kind, shape in (
        (ASSIGNMENTS, Kind.ASSIGNMENTS, _HOSTED),
        (DOMAINS, Kind.DOMAINS, _HOSTED),
        (MIGRATIONS, Kind.MIGRATIONS, _HOSTED),
        (VMS, Kind.VMS, _IN_SCOPE),
        (VM_STATUS, Kind.VM_STATUS, _IN_SCOPE),
        (RULES, Kind.RULES, _IN_SCOPE),
        (HOSTS, Kind.HOSTS, _A_HOST),
        (HOST_STATUS, Kind.HOST_STATUS, _A_HOST),
        (POLICIES, Kind.POLICIES, _BY_SCOPE),
        (REQUESTS, Kind.REQUESTS, _NAMED_ONLY),
        (IMAGES, Kind.IMAGES, _NAMED_ONLY),
        (ELECTION, Kind.ELECTION, _NAMED_ONLY),
    )
}
_ROOT_LEN = len(ROOT)
PREFIXES: dict[Kind, str] = {kind: f"{ROOT}{folder}/" for folder, (kind, _s) in _FOLDERS.items()}
"""The folder (prefix) of each kind's keys."""
HOSTED = frozenset(kind for kind, shape in _FOLDERS.values() if shape == _HOSTED)
"""Kinds whose keys name a host first (`<folder><host>/<scope>/<vm>`)."""


def classify(key: str) -> Key:
    """The kind and names of any key (never raises: a malformed one keeps what it has)."""
    if not key.startswith(ROOT):
        return Key(Kind.OTHER, key)
    folder, slash, rest = key[_ROOT_LEN:].partition("/")
    found = _FOLDERS.get(folder) if slash else None
    if found is None:
        return Key(Kind.CONFIG, "") if key == CONFIG else Key(Kind.OTHER, key)
    kind, shape = found
    if shape == _HOSTED:
        host, _, rest = rest.partition("/")
        scope, _, name = rest.partition("/")
        return Key(kind, rest, host, scope, name)
    if shape == _IN_SCOPE:
        scope, _, name = rest.partition("/")
        return Key(kind, rest, "", scope, name)
    if shape == _A_HOST:
        return Key(kind, rest, rest, "", rest)
    if shape == _BY_SCOPE:
        return Key(kind, rest, "", rest)
    return Key(kind, rest, "", "", rest)


def prefix_end(prefix: str) -> str:
    """The range end covering every key that starts with `prefix` (etcd's prefix range)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()
