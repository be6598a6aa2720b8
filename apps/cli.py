"""The `forge` command (a console script, pyproject [project.scripts]): one entry to the apps.

    forge grpo [--config PATH] [overrides ...]     = python -m apps.grpo.main ...
    forge sft  [--config PATH] [overrides ...]     = python -m apps.sft.main ...
    forge demo [--config PATH] [overrides ...]     = python -m apps.demo.main ...
    forge worker --address tcp://HOST:PORT         one attachable host (provisioner.job: attach)
    forge launch slurm --config PATH --nodes N [--dry-run] [overrides ...]
    forge grpo --help                              every config key, its value and meaning
    forge --version

It lives in `apps` (the top of the stack), not in the `forge` library: the library never
imports the apps. Each app module is imported only when its command is chosen, so
`forge --help` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

# command -> (module, its entry function, one line)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "grpo": ("apps.grpo.main", "cli", "GRPO-family RL training (the embedded default: a tiny model on CPU)"),
    "sft": ("apps.sft.main", "cli", "supervised fine-tuning on completion tokens"),
    "demo": ("apps.demo.main", "main", "the actor runtime demo (local or Monarch processes)"),
    "worker": ("apps.launch", "worker_cli", "one Monarch worker host for provisioner.job: attach (--address tcp://HOST:PORT)"),
    "launch": ("apps.launch", "launch_cli", "submit a multi-host run: launch slurm --config PATH --nodes N [--dry-run]"),
}


def version() -> str:
    try:
        return metadata.version("forge")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: forge COMMAND [--config PATH ...] [overrides ...]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "  forge COMMAND --help   every config key of COMMAND with its value and meaning, the override",
              "                         forms (--a.b v, --a.b=v, a.b=v, ~a.b, ${...}) and the shipped configs",
              "  forge --version", "",
              "examples:",
              "  forge grpo                                        # the embedded default: SFT warm-up + GRPO on CPU",
              "  forge grpo --steps 100 --trainer.optimizer.lr 3e-4 off_by_n=0",
              "  forge sft --config apps/sft/llama3_8b.yaml --model /models/Llama-3.1-8B-Instruct"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"forge {version()}")
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        sys.stderr.write(f"forge: unknown command '{argv[0]}' (expected one of: {', '.join(COMMANDS)})\n\n" + usage())
        return 2
    module, func, _ = cmd
    rc = getattr(importlib.import_module(module), func)(argv[1:])
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
