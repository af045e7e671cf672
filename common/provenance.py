"""What a run needs to be reproduced: package versions, the app's git commit, the machine, the
seeds. Written to the run directory as environment.json next to the resolved config."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from common.config import FedLoraConfig

APP_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("fedlora", "torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets",
            "numpy", "safetensors", "opacus", "ray", "tokenizers", "accelerate")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(app_dir: Path = APP_DIR) -> dict[str, object]:
    """The app's commit and whether its tracked files differ from it; {} outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(app_dir), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted-changes": dirty}


def run_environment(cfg: FedLoraConfig) -> dict[str, object]:
    seeds = {"seed": cfg.seed,
             "uses": "client sampling, partitions, LoRA initialisation, dropout, batch order"}
    if cfg.differential_privacy or cfg.client_level_dp:
        seeds["not-seeded"] = ("differential-privacy noise and sampling come from the operating "
                               "system: a seed the coordinator knows would void the guarantee")
    from common.model import cpu_bf16_applies  # torch: the server has it loaded already

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions(), "app": git_commit(), "seeds": seeds,
            # Sites on this machine (a simulation's) train in bf16 or float32 (cpu-bf16).
            "cpu-training-dtype": "bfloat16" if cpu_bf16_applies(cfg) else "float32"}
