"""`hypernat`: the operator's command.  Each subcommand lives in the module that owns
its subject and parses its own arguments; this file only dispatches."""
import importlib
import sys

COMMANDS = {
    # name: (module, function, one-line help)
    "check": ("hypernat.config", "check_main", "validate a config file and print the partition table"),
    "ctl": ("hypernat.coord.ctl", "main", "query a running coordinator: status, nics, counters, rule"),
    "lab": ("hypernat.lab.cli", "main", "the namespace testbed: up | run | down (root)"),
    "demo": ("hypernat.demo", "main", "the main job: the testbed as root, else the emulated deployment"),
    "trace": ("hypernat.trace", "main", "generate or inspect packet traces (pcap)"),
    "report": ("hypernat.report", "main", "regenerate the evaluation results"),
}


def usage() -> str:
    lines = ["usage: hypernat COMMAND [ARGS]  (hypernat COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "daemons: hypernat-coord (the coordinator), hypernat-nic (one per NIC)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hypernat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        print(f"hypernat {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return getattr(mod, func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
