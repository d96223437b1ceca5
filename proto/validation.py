"""Checks of what comes in (names, sizes, selectors, images, the cluster config) so that
nothing malformed reaches a key or a libvirt name; each raises InvalidInput naming it."""

from __future__ import annotations

from collections.abc import Mapping

from hvplace.proto.codec import dumps
from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import (
    check_cmdline,
    check_int,
    check_label,
    check_label_key,
    check_name,
    check_number,
    check_path,
    check_relative_path,
    check_selector_value,
    check_sha256,
    check_text,
    is_under,
    quote,
)
from hvplace.proto.records import (
    TOPOLOGY_HOST,
    VM,
    ClusterConfig,
    Enforcement,
    HostInfo,
    Image,
    Rule,
    RuleKind,
    ScopePolicy,
)
from hvplace.proto.selectors import LabelExpression, LabelSelector, NodeAffinity, Op
from hvplace.proto.timing import CLOCK_MARGIN_S, check_budget

# Bounds on sizes: positive and bounded (SPEC §6).
MAX_VCPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_DISK_GIB = 1024 * 1024
MAX_LABELS = 64
MAX_RULE_NAME = 40  # vCD limits a rule name to 40 characters (seeds/003).
MAX_MEMBERS = 10_000
MAX_DESCRIPTION = 1024
MAX_TERMS = 8
"""Required (OR-ed) and preferred node affinity terms, each."""
MAX_EXPRESSIONS = 16
"""Expressions in one selector or node affinity term."""
MAX_EXPRESSION_VALUES = 64
"""Values of one In / NotIn expression."""
MAX_IMAGE_ROOTS = 16
MAX_VM_BYTES = 8192


def _check_labels(labels: Mapping[str, str], what: str) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{what} has {len(labels)} labels; at most {MAX_LABELS}")
    for k, v in labels.items():
        check_label(k, v, f"{what} label")


def _check_expression(e: LabelExpression, what: str) -> None:
    check_label_key(e.key, f"{what} expression")
    about = f"{what}: `{e.key} {e.operator.value}`"
    if e.operator in (Op.IN, Op.NOT_IN):
        if not e.values:
            raise InvalidInput(f"{about} needs at least one value")
        if len(e.values) > MAX_EXPRESSION_VALUES:
            raise InvalidInput(
                f"{about} has {len(e.values)} values; at most {MAX_EXPRESSION_VALUES}"
            )
        for v in e.values:
            check_selector_value(v, about)
    elif e.operator in (Op.EXISTS, Op.DOES_NOT_EXIST):
        if e.values:
            raise InvalidInput(f"{about} takes no values")
    else:
        if len(e.values) != 1:
            raise InvalidInput(f"{about} takes exactly one value, got {len(e.values)}")
        check_number(e.values[0], about)


def _check_expressions(exprs: tuple[LabelExpression, ...], what: str) -> None:
    if len(exprs) > MAX_EXPRESSIONS:
        raise InvalidInput(f"{what} has {len(exprs)} expressions; at most {MAX_EXPRESSIONS}")
    for e in exprs:
        _check_expression(e, what)


def _check_selector(selector: LabelSelector, what: str) -> None:
    _check_labels(selector.match_labels, what)
    _check_expressions(selector.match_expressions, what)


def _check_node_affinity(affinity: NodeAffinity, what: str) -> None:
    for terms, kind in ((affinity.required, "required"), (affinity.preferred, "preferred")):
        if len(terms) > MAX_TERMS:
            raise InvalidInput(f"{what} has {len(terms)} {kind} terms; at most {MAX_TERMS}")
    for term in affinity.required:
        if not term.match_expressions:
            raise InvalidInput(f"{what}: a required node affinity term is empty")
        _check_expressions(term.match_expressions, f"{what} node affinity")
    for p in affinity.preferred:
        check_int(p.weight, f"{what} preferred node affinity weight", 1, 100)
        _check_expressions(p.term.match_expressions, f"{what} node affinity")


IMAGE_FILES = ("kernel", "initrd", "disk")


def validate_image(image: Image, what: str) -> Image:
    """Paths absolute and plain (relative, each with its sha256, for a catalogue image),
    the command line printable ASCII, all bounded; an initrd only with a kernel. Whether
    an image is given at all is the caller's rule."""
    if image.name:
        check_name(image.name, f"{what} image name")
    for field_name in IMAGE_FILES:
        path = getattr(image, field_name)
        digest = getattr(image, f"{field_name}_sha256")
        where = f"{what} image {field_name}"
        if image.name:
            if path:
                check_relative_path(path, where)
                if not digest:
                    raise InvalidInput(f"{where} {quote(path)} has no sha256")
            if digest:
                check_sha256(digest, f"{where} sha256")
                if not path:
                    raise InvalidInput(f"{where} has a sha256 but no file")
        else:
            if path:
                check_path(path, where)
            if digest:
                raise InvalidInput(f"{where} has a sha256, which only a catalogue image has")
    check_cmdline(image.cmdline, f"{what} image cmdline")
    if image.initrd and not image.kernel:
        raise InvalidInput(f"{what} image has an initrd but no kernel")
    return image


def validate_catalogue_image(image: Image) -> Image:
    """A catalogue record: named, with a kernel or a base disk, each file relative."""
    if not image.name:
        raise InvalidInput("an image needs a name")
    what = f"image {image.name!r}"
    validate_image(image, "catalogue")
    if not has_image(image):
        raise InvalidInput(f"{what} names neither a kernel nor a disk")
    if image.disk and image.kernel:
        raise InvalidInput(f"{what} names both a kernel and a disk; give one")
    return image


def check_image_roots(image: Image, roots: tuple[str, ...], what: str) -> Image:
    """With `roots`, each path of the image lies under one of them (a catalogue image's
    paths are relative to the hosts' image directories instead)."""
    if roots and not image.name:
        for field_name in ("kernel", "initrd", "disk"):
            path = getattr(image, field_name)
            if path and not any(is_under(path, r) for r in roots):
                raise InvalidInput(
                    f"{what} image {field_name} {quote(path)} is outside the cluster's image"
                    f" roots ({quote(', '.join(roots))})"
                )
    return image


def has_image(image: Image) -> bool:
    """A VM boots from a kernel or a base disk; an image with neither is no image."""
    return bool(image.kernel or image.disk)


def validate_vm(vm: VM) -> VM:
    """Raise InvalidInput naming the first problem; return the VM unchanged if sound.

    Every text that reaches libvirt XML is checked here (the agent runs the same check
    before it renders a domain), so XML 1.0 can carry it and libvirt accepts it."""
    check_name(vm.scope, "scope")
    check_name(vm.name, "VM name")
    what = f"VM {vm.name!r}"
    if vm.uid:
        check_name(vm.uid, f"{what} uid")
    if vm.request_id:
        check_name(vm.request_id, f"{what} request id")
    _check_labels(vm.labels, what)
    r = vm.resources
    check_int(r.vcpus, f"{what} vcpus", 1, MAX_VCPUS)
    check_int(r.memory_mib, f"{what} memory_mib", 1, MAX_MEMORY_MIB)
    check_int(r.disk_gib, f"{what} disk_gib", 0, MAX_DISK_GIB)
    check_text(vm.description, f"{what} description", MAX_DESCRIPTION)
    _check_node_affinity(vm.node_affinity, what)
    validate_image(vm.image, what)
    return vm


def _size_bound(vm: VM) -> int:
    """An upper bound of `len(dumps(vm))`: JSON escapes a character to at most 12 bytes
    (a surrogate pair), and each label, term, expression and value adds bounded syntax."""
    texts = [vm.scope, vm.name, vm.uid, vm.request_id, vm.description]
    texts += [vm.image.kernel, vm.image.initrd, vm.image.cmdline, vm.image.disk, vm.image.name]
    syntax_image = 3 * (64 + 20) if vm.image.name else 0  # the digests
    texts += vm.labels.keys()
    texts += vm.labels.values()
    syntax = 400 + syntax_image + 6 * len(vm.labels)
    terms = [*vm.node_affinity.required, *(p.term for p in vm.node_affinity.preferred)]
    for term in terms:
        syntax += 60
        for e in term.match_expressions:
            syntax += 60 + 3 * len(e.values)
            texts.append(e.key)
            texts += e.values
    return syntax + 12 * sum(map(len, texts))


def check_vm_size(vm: VM) -> VM:
    """The stored spec stays small: it is written twice per VM (spec and assignment) and a
    transaction carries up to 500 VMs within etcd's 16 MiB request limit."""
    if _size_bound(vm) <= MAX_VM_BYTES:
        return vm  # the common case, without encoding the record
    size = len(dumps(vm))
    if size > MAX_VM_BYTES:
        raise InvalidInput(
            f"VM {vm.name!r} spec is {size} bytes as stored; at most {MAX_VM_BYTES}: use fewer"
            " or shorter labels, node affinity terms or values"
        )
    return vm


def validate_rule(rule: Rule) -> Rule:
    """Checks that need no other record; conflicts with other rules are the engine's."""
    check_name(rule.scope, "scope")
    check_name(rule.name, "rule name")
    if len(rule.name) > MAX_RULE_NAME:
        raise InvalidInput(
            f"rule name {rule.name!r} is {len(rule.name)} characters; at most {MAX_RULE_NAME}"
        )
    what = f"rule {rule.name!r}"
    if rule.enforcement is Enforcement.PREFERRED:
        check_int(rule.weight, f"{what} weight", 1, 100)
    elif rule.weight:
        raise InvalidInput(f"{what}: weight applies only to preferred rules")
    if len(rule.members) > MAX_MEMBERS:
        raise InvalidInput(f"{what} has {len(rule.members)} members; at most {MAX_MEMBERS}")
    for m in rule.members:
        check_name(m, f"{what} member")
    if len(set(rule.members)) != len(rule.members):
        raise InvalidInput(f"{what} names a member twice")
    if rule.selector is not None:
        _check_selector(rule.selector, f"{what} selector")
    has_selector = rule.selector is not None and not rule.selector.is_empty()
    if not has_selector and len(rule.members) < 2:
        raise InvalidInput(
            f"{what} names {len(rule.members)} member(s); a rule needs at least"
            " two VMs or a label selector"
        )
    if rule.topology_key != TOPOLOGY_HOST:
        check_label_key(rule.topology_key, f"{what} topology")
    check_int(rule.max_per_domain, f"{what} max_per_domain", 1, MAX_MEMBERS)
    check_int(rule.min_domains, f"{what} min_domains", 0, MAX_MEMBERS)
    check_int(rule.max_members, f"{what} max_members", 0, MAX_MEMBERS)
    if rule.max_members and len(rule.members) > rule.max_members:
        raise InvalidInput(
            f"{what} names {len(rule.members)} members; its max_members is {rule.max_members}"
        )
    if rule.kind is RuleKind.AFFINITY and (rule.max_per_domain != 1 or rule.min_domains):
        raise InvalidInput(f"{what}: max_per_domain and min_domains apply to anti_affinity only")
    check_text(rule.description, f"{what} description", MAX_DESCRIPTION)
    return rule


def validate_policy(policy: ScopePolicy) -> ScopePolicy:
    check_name(policy.scope, "scope")
    what = f"scope {policy.scope!r}"
    check_int(policy.spread, f"{what} spread", 0, MAX_MEMBERS)
    if len(policy.label_keys) > MAX_LABELS:
        raise InvalidInput(
            f"{what} policy names {len(policy.label_keys)} label keys; at most {MAX_LABELS}"
        )
    for k in policy.label_keys:
        check_label_key(k, f"{what} policy label")
    return policy


def validate_host_info(info: HostInfo) -> HostInfo:
    check_name(info.name, "host name")
    _check_labels(info.labels, f"host {info.name!r}")
    c = info.capacity
    check_int(c.vcpus, f"host {info.name!r} vcpus", 1, 1_000_000)
    check_int(c.memory_mib, f"host {info.name!r} memory_mib", 1, 1 << 40)
    check_int(c.disk_gib, f"host {info.name!r} disk_gib", 0, 1 << 40)
    for what, ratio in (
        ("cpu", info.ratios.cpu),
        ("ram", info.ratios.ram),
        ("disk", info.ratios.disk),
    ):
        if not (0 < ratio <= 64):
            raise InvalidInput(f"host {info.name!r} {what} ratio {ratio} must be in (0, 64]")
    check_int(info.reserved_memory_mib, f"host {info.name!r} reserved_memory_mib", 0, 1 << 40)
    return info


def validate_cluster_config(
    cfg: ClusterConfig, clock_margin_s: float = CLOCK_MARGIN_S
) -> ClusterConfig:
    """The cluster config: its timing budget (timing.check_budget), admission and images."""
    check_budget(cfg, clock_margin_s)
    check_int(cfg.admission_failures, "admission_failures", 1, 16)
    if cfg.admission_topology != TOPOLOGY_HOST:
        check_label_key(cfg.admission_topology, "admission_topology")
    if len(cfg.image_roots) > MAX_IMAGE_ROOTS:
        raise InvalidInput(f"{len(cfg.image_roots)} image_roots; at most {MAX_IMAGE_ROOTS}")
    for root in cfg.image_roots:
        check_path(root, "image root")
    if cfg.default_image is not None:
        validate_image(cfg.default_image, "cluster default")
        if not has_image(cfg.default_image):
            raise InvalidInput("the cluster default image names neither a kernel nor a disk")
        check_image_roots(cfg.default_image, cfg.image_roots, "cluster default")
    check_int(cfg.max_start_attempts, "max_start_attempts", 1, 100)
    return cfg
