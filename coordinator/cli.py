"""The `hvplace` operator CLI (placeholder until the coordinator issue lands)."""


def main() -> None:
    raise SystemExit("hvplace: not built yet")
