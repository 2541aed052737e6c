"""The run card: a markdown record of exactly what ran, on which data, with what result."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from typing import Dict, Optional

import yaml

PACKAGES = ("tidal", "torch", "ray", "transformers", "tokenizers", "numpy", "pyarrow", "wandb",
            "hydra-core")


def package_versions(names=PACKAGES) -> Dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(cwd: Optional[str] = None) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def render(config: Dict, facts: Dict, results: Optional[Dict] = None) -> str:
    """Markdown for the run card; ``facts`` are run-level values (model size, data, ...)."""
    lines = [f"# Run card: {facts.get('run_name', '?')}", ""]
    lines += ["## What ran", "", "| | |", "|---|---|"]
    for k, v in facts.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Stop criteria", "",
              f"- train.max_steps = {config['train']['max_steps']} optimizer steps "
              f"(= {config['train']['max_steps'] * config['train']['global_batch_tokens']:,} tokens)",
              f"- evaluation every {config['train']['eval_every']} steps; checkpoint every "
              f"{config['train']['checkpoint_every'] or 'end only'}",
              ""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        for k, v in results.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    lines += ["## Packages", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in package_versions().items()]
    lines += ["", f"Python {platform.python_version()} on {platform.platform()}", "",
              "## Resolved configuration", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write(path: str, config: Dict, facts: Dict, results: Optional[Dict] = None) -> str:
    with open(path + ".tmp", "w") as f:
        f.write(render(config, facts, results))
    os.replace(path + ".tmp", path)
    return path


def lineage(model_dir, depth: int = 6) -> str:
    """Where a model came from, newest first: an export's run directory holds the run's
    ``config.yaml``, whose ``model.pretrained`` is the model it started from."""
    import yaml

    chain, seen = [], set()
    while model_dir and len(chain) < depth and model_dir not in seen:
        seen.add(model_dir)
        chain.append(str(model_dir))
        conf = os.path.join(os.path.dirname(os.path.normpath(str(model_dir))), "config.yaml")
        try:
            with open(conf) as f:
                model_dir = ((yaml.safe_load(f) or {}).get("model") or {}).get("pretrained")
        except (OSError, yaml.YAMLError):
            break
    return " <- ".join(chain) + ("" if model_dir is None or model_dir in seen else " <- ...")
