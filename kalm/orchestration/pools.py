"""Work-pool deployments for `kalm deploy`: ``infra/prefect.yaml`` (the ``kalm-local`` process pool) and
``infra/prefect-gpu.yaml`` (the ``kalm-gpu`` Kubernetes pool), deployed with Prefect's own ``prefect deploy``.

:func:`deploy_pools` deploys every deployment whose work pool exists on the server (``--create-pools``
creates the process pools first), and names each one it skipped with its missing pool and the command that
creates it, instead of failing the whole file as ``prefect deploy --all`` does. It runs ``prefect deploy``
from the repository root, so a process worker runs the flows in this checkout (no pull step, no variable).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kalm.core.config import REPO_ROOT, read_yaml
from kalm.core.errors import KalmError

POOL_FILES = (REPO_ROOT / "infra" / "prefect.yaml", REPO_ROOT / "infra" / "prefect-gpu.yaml")
# pools `--create-pools` may create here; others need their worker package and a cluster
POOL_TYPES = {"kalm-local": "process", "kalm-gpu": "kubernetes"}
CREATABLE = {"process"}


@dataclass(frozen=True)
class PoolDeployment:
    file: Path
    name: str
    pool: str


@dataclass
class DeployReport:
    deployed: list[PoolDeployment] = field(default_factory=list)
    skipped: list[PoolDeployment] = field(default_factory=list)
    created_pools: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"created work pool {p} ({POOL_TYPES.get(p, '?')})" for p in self.created_pools]
        out += [f"deployed {d.name} (pool {d.pool}, {d.file.name})" for d in self.deployed]
        for d in self.skipped:
            kind = POOL_TYPES.get(d.pool, "TYPE")
            out.append(
                f"skipped {d.name}: work pool {d.pool} does not exist "
                f"(prefect work-pool create {d.pool} --type {kind}, then kalm deploy again)"
            )
        return out


def pool_deployments(files: tuple[Path, ...] = POOL_FILES) -> list[PoolDeployment]:
    """Every deployment of the files with its work pool; a deployment without one is a config error."""
    out = []
    for f in files:
        if not f.is_file():
            raise KalmError(f"{f}: no such deployment file")
        raw = read_yaml(f)
        for d in raw.get("deployments") or []:
            pool = (d.get("work_pool") or {}).get("name")
            if not d.get("name") or not pool:
                raise KalmError(f"{f}: deployment {d.get('name')!r} names no work pool")
            out.append(PoolDeployment(f, str(d["name"]), str(pool)))
    return out


def _prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("prefect"))
    return subprocess.run(
        [exe, "--no-prompt", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def existing_pools(names: set[str], env: dict[str, str]) -> set[str]:
    return {n for n in sorted(names) if _prefect("work-pool", "inspect", n, env=env).returncode == 0}


def deploy_pools(api: str, create_pools: bool = False, files: tuple[Path, ...] = POOL_FILES) -> DeployReport:
    """Deploy what has a pool on the server at ``api``; see the module docstring."""
    deps = pool_deployments(files)
    env = {**os.environ, "PREFECT_API_URL": api}
    have = existing_pools({d.pool for d in deps}, env)
    report = DeployReport()
    if create_pools:
        for pool in sorted({d.pool for d in deps} - have):
            if POOL_TYPES.get(pool) in CREATABLE:
                r = _prefect("work-pool", "create", pool, "--type", POOL_TYPES[pool], env=env)
                if r.returncode != 0:
                    raise KalmError(f"cannot create work pool {pool}: {_last_line(r)}")
                have.add(pool)
                report.created_pools.append(pool)
    for f in files:
        ready = [d for d in deps if d.file == f and d.pool in have]
        report.skipped += [d for d in deps if d.file == f and d.pool not in have]
        if not ready:
            continue
        names = [a for d in ready for a in ("--name", d.name)]
        r = _prefect("deploy", "--prefect-file", str(f), *names, env=env)
        if r.returncode != 0:
            raise KalmError(f"prefect deploy of {f.name} failed: {_last_line(r)}")
        report.deployed += ready
    return report


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    text = (r.stderr or "") + (r.stdout or "")
    lines = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines() if ln.strip(" │╭╮╰╯─")]
    return lines[-1] if lines else f"exit code {r.returncode}"
