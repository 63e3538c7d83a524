"""The partitioned data stage: every recipe of a stage ingested, deduplicated (exact and near, across all
recipes) and decontaminated in work units that run on any executor (:mod:`kalm.data.executors`).

Identity is data: each recipe's source is split into partitions from its sorted file listing
(:mod:`kalm.data.partitions`), and row ``i`` of partition ``p`` of the recipe ranked ``k`` (by name) in
the stage has the key ``k << 52 | p << 28 | i`` (up to 4,096 recipes per stage, 16M partitions per recipe,
268M rows per partition). The smallest key is the first row in recipe-name, file and
line order: the row a duplicate cluster keeps (what the single-process engine keeps too).

Units, each writing its files, then a marker listing them (a unit is done when its marker's files are
intact: a rerun after a crash, of a worker or of the driver, redoes only unfinished units)::

    sign     one per partition: read, map, clean, MinHash; write rows, signatures, id-hash slots and
             LSH band-bucket slots (checksummed per slot)    work/<stage>/sign/<recipe>/<fp>/
    exact    one per range of id-hash slots: rows with equal ids -> the smallest key keeps the row
    bands    one per (band, range of bucket slots): buckets are whole in one unit; star edges from each
             bucket's smallest key, exact copies counted once (never k^2 pairs, never a blown-up bucket)
    verify1  one per partition: attach the signatures of the edges' smaller end
    verify2  one per partition: attach the other end's, keep pairs with estimated Jaccard >= threshold
    cluster  one: connected components of the verified edges; the smallest key survives
    apply    one per partition: drop its rows (reason and the recipe that lost them), split off held-out
             rows, decontaminate against the eval index; write the final shard
                                                             work/<stage>/reduce/<fp>/
    publish  in the driver: each recipe's shards become mixtures/<stage>/<recipe>/ (one shard per
             partition, named by it: the same rows in the same shards whatever the executor)

Memory per unit is bounded by one partition (sign, verify, apply) or by ``reduce_unit_rows`` keys (exact,
bands: each sign unit writes its keys as Arrow IPC files of 256 hash slots, a slot = a hash's top 8 bits,
and each reduce unit reads a contiguous range of slots of every partition, the number of units following
the stage's rows); the cluster unit holds only the verified near-duplicate edges. Reasons: ``exact_dup`` /
``near_dup`` (the survivor is in the same recipe), ``cross_recipe_dup`` / ``cross_recipe_near_dup`` (in
another: counted in the recipe that lost the row), ``contaminated``; precedence exact > near > contamination.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST, mixture_root
from kalm.core.results import StageResult
from kalm.core.schema import SCHEMA_VERSION
from kalm.core.storage import DataRoot, digest_of
from kalm.data import minhash
from kalm.data.config import IngestConfig
from kalm.data.executors import Executor
from kalm.data.ingest import ingest_fingerprint
from kalm.data.mixtures import EvalIndex, load_eval_texts
from kalm.data.outputs import holdout_texts, ingest_result, publish_recipe, sweep_tmp, unchanged_stage
from kalm.data.partitions import Partition, plan_partitions
from kalm.data.readers import source_fingerprint
from kalm.data.recipes import LoadedRecipe
from kalm.data.slots import peak_rss_mb
from kalm.data.units import (
    ENGINE_VERSION,
    MAX_PARTITIONS,
    MAX_RECIPES,
    PART_BITS,
    SLOTS,
    SignedRecipe,
    apply_unit,
    bands_unit,
    cluster_unit,
    done,
    exact_unit,
    near_params,
    ref,
    sign_file,
    sign_unit,
    verify1_unit,
    verify2_unit,
    work_root,
)

log = logging.getLogger(__name__)


def _run(
    executor: Executor, fn: Any, calls: list[dict[str, Any]], what: str, peaks: dict[str, float]
) -> list[dict[str, Any]]:
    out = _run_settled(executor, fn, calls, what, peaks)
    for res in out:
        if isinstance(res, KalmError):
            raise res
    return out  # type: ignore[return-value]


def run_stage_distributed(
    stage: str,
    recipes: Sequence[LoadedRecipe],
    root: DataRoot,
    cfg: IngestConfig,
    executor: Executor,
    *,
    force: bool = False,
    forced: Collection[str] = (),
    eval_texts: Sequence[str] = (),
) -> tuple[list[StageResult], list[StageResult], dict[str, BaseException]]:
    """Build every recipe's mixture of ``stage`` (``force``: all of it again; ``forced``: those recipes'
    partitions again). Returns (ingest results, mixture results, failures by recipe): a recipe whose source
    cannot be read fails alone; the others are built without it."""
    t0 = time.perf_counter()
    failed: dict[str, BaseException] = {}
    peaks: dict[str, float] = {}  # peak RSS (MB) per phase's largest unit, and of the driver
    wr = work_root(stage)
    if executor.kind == "ray" and getattr(executor, "joined", False) and root.is_local:
        log.warning(
            "joined a Ray cluster with the local data root %s: every node must see it at that path (a shared "
            "file system), else use an s3:// data root",
            root.uri,
        )
    cfg_json = cfg.model_dump(mode="json")
    signed: list[SignedRecipe] = []
    if len(recipes) > MAX_RECIPES:
        raise KalmError(
            f"stage {stage}: {len(recipes)} recipes, the partitioned engine takes at most {MAX_RECIPES}"
        )
    for rank, lr in enumerate(sorted(recipes, key=lambda x: x.name)):
        try:
            parts = plan_partitions(lr, cfg.partition_bytes)
            if len(parts) > MAX_PARTITIONS:
                raise KalmError(
                    f"{lr.name}: {len(parts)} partitions (at most {MAX_PARTITIONS}): raise partition_bytes"
                )
            src = hash_obj(source_fingerprint(lr.recipe.source, lr.dir))
        except KalmError as err:
            failed[lr.name] = err
            continue
        fp = hash_obj(
            {
                "ingest": ingest_fingerprint(lr, cfg, False),
                "source": src,
                "engine": ENGINE_VERSION,
                "parts": [p.to_json() for p in parts],
            }
        )
        d = f"{wr}/sign/{lr.name}/{fp}"
        if force or lr.name in forced:
            root.delete_dir(d)
        else:
            sweep_tmp(root, d)
        signed.append(SignedRecipe(lr, rank, d, fp, parts, {}))
    # 1. sign
    calls: list[dict[str, Any]] = []
    owners: list[SignedRecipe] = []
    for r in signed:
        for p in r.parts:
            if (m := done(root, r.dir, p.label)) is not None:
                r.markers[p.index] = m
            else:
                calls.append(
                    {
                        "unit": p.label,
                        "root_uri": root.uri,
                        "recipe_path": str(r.lr.path),
                        "part": p.to_json(),
                        "cfg": cfg_json,
                        "out": r.dir,
                    }
                )
                owners.append(r)
    cached_sign = {r.lr.name: len(r.markers) == len(r.parts) for r in signed}
    for r, res in zip(owners, _run_settled(executor, sign_unit, calls, "sign", peaks), strict=True):
        if isinstance(res, KalmError):
            failed.setdefault(r.lr.name, res)
        else:
            r.markers[Partition(**res["partition"]).index] = res
    signed = [r for r in signed if r.lr.name not in failed]
    for r in signed:  # older fingerprints of this recipe: a changed source or config, never read again
        for old in root.list_all_dirs(f"{wr}/sign/{r.lr.name}"):
            if old != r.fp:
                root.delete_dir(f"{wr}/sign/{r.lr.name}/{old}")
    ingested = [ingest_result(root, r, cached_sign[r.lr.name]) for r in signed]
    # 2. the eval index: configured eval texts, eval tasks, and every recipe's held-out rows
    index = None
    if cfg.decontamination.enabled:
        texts = load_eval_texts(
            root,
            cfg.model_copy(
                update={"decontamination": cfg.decontamination.model_copy(update={"include_holdouts": False})}
            ),
            [],
        ) + list(eval_texts)
        if cfg.decontamination.include_holdouts:
            texts += holdout_texts(root, signed)
        mp = near_params(cfg)
        index = EvalIndex.build(
            texts,
            cfg.decontamination,
            minhash.MinHashParams(mp.num_perm, mp.ngram, cfg.decontamination.threshold, mp.seed),
        )
    red_fp = hash_obj(
        {
            # the sign outputs' checksums, not only their fingerprints: a forced re-sign by changed code
            # must not reuse a reduce (or a published mixture) of the old rows
            "sign": [
                (r.lr.name, r.fp, [digest_of(f) for m in r.markers.values() for f in m["files"]])
                for r in signed
            ],
            "near": cfg.near_dedup.model_dump(),
            "eval": index.fingerprint if index else None,
            "engine": ENGINE_VERSION,
        }
    )
    red = f"{wr}/reduce/{red_fp}"
    for d in root.list_all_dirs(f"{wr}/reduce"):  # a killed run's reduce for other inputs: never resumed
        if d != red_fp:
            root.delete_dir(f"{wr}/reduce/{d}")
    if not force and (same := unchanged_stage(root, stage, signed, red_fp)) is not None:
        log.info("stage %s: every recipe's partitions and the eval index unchanged, mixtures kept", stage)
        if not cfg.keep_intermediates:
            root.delete_dir(red)  # left by a run killed after it published
        return ingested, same, failed
    sweep_tmp(root, red)
    if force:
        root.delete_dir(red)

    # 3. exact, 4. bands, 5. verify, 6. cluster: units over ranges of hash slots, as many as the rows need
    total = sum(m["rows"] for r in signed for m in r.markers.values())
    n_red = min(SLOTS, max(1, -(-total // cfg.reduce_unit_rows)))
    ranges = [(u * SLOTS // n_red, (u + 1) * SLOTS // n_red) for u in range(n_red)]

    def sources(name: str) -> list[tuple[dict[str, Any], int]]:
        """One sign file of every partition, in (recipe, partition) order: the keys come out sorted."""
        refs = [(sign_file(r, i, name), r.rank) for r in signed for i in sorted(r.markers)]
        return [(ref, rank) for ref, rank in refs if ref is not None]

    def call(unit: str, **extra: Any) -> dict[str, Any]:
        return {"unit": unit, "root_uri": root.uri, "out": red, **extra}

    # unit names carry their slot range: a resume with another unit count never reuses a wrong marker
    xs = sources("exact.arrow")
    ex = _units(
        executor,
        root,
        red,
        exact_unit,
        [call(f"x{lo:03d}-{hi:03d}", sources=xs, slots=[lo, hi]) for lo, hi in ranges],
        "exact",
        peaks,
    )
    stats: dict[str, Any] = {"exact_dups": sum(m["dups"] for m in ex), "reduce_units_per_band": n_red}
    near_by: dict[int, list[dict[str, Any]]] = {}
    if cfg.near_dedup.enabled:
        mp = near_params(cfg)
        bs = sources("bands.arrow")
        bc = [
            call(f"b{b}-{lo:03d}-{hi:03d}", sources=bs, slots=[b * SLOTS + lo, b * SLOTS + hi])
            for b in range(mp.lsh_shape()[0])
            for lo, hi in ranges
        ]
        bu = _units(executor, root, red, bands_unit, bc, "bands", peaks)
        stats["candidate_edges"] = sum(m["edges"] for m in bu)
        stats["largest_bucket"] = max((m["largest_bucket"] for m in bu), default=0)
        sig_of = {_gp(r.rank, i): sign_file(r, i, "sig.arrow") for r in signed for i in r.markers}
        common = {"root_uri": root.uri, "out": red, "num_perm": mp.num_perm}
        v1 = _units(
            executor,
            root,
            red,
            verify1_unit,
            [
                {"unit": f"v1-{g}", "inputs": ins, "sig": sig_of[g], **common}
                for g, ins in _route(red, bu, "bands/").items()
            ],
            "verify1",
            peaks,
        )
        v2 = _units(
            executor,
            root,
            red,
            verify2_unit,
            [
                {"unit": f"v2-{g}", "inputs": ins, "sig": sig_of[g], "threshold": mp.threshold, **common}
                for g, ins in _route(red, v1, "v1/").items()
            ],
            "verify2",
            peaks,
        )
        stats["verified_edges"] = sum(m["verified"] for m in v2)
        inputs = [ref(red, f) for m in v2 for f in m["files"]]
        cl = _units(
            executor,
            root,
            red,
            cluster_unit,
            [{"unit": "cluster", "root_uri": root.uri, "out": red, "inputs": inputs}],
            "cluster",
            peaks,
        )
        stats.update(near_dups=cl[0]["dups"], largest_cluster=cl[0]["largest_cluster"])
        near_by = _route(red, cl, "near/")
    exact_by = _route(red, ex, "exact/")
    # 7. apply
    calls = []
    for r in signed:
        for i in sorted(r.markers):
            g = _gp(r.rank, i)
            calls.append(
                {
                    "unit": f"a-{r.lr.name}-{Partition(**r.markers[i]['partition']).label}",
                    "root_uri": root.uri,
                    "out": red,
                    "rows": sign_file(r, i, "rows.parquet"),
                    "rank": r.rank,
                    "exact": exact_by.get(g, []),
                    "near": near_by.get(g, []),
                    "index": index,
                    "final": f"out/{r.lr.name}/part-{i:05d}.parquet",
                }
            )
    applied = _units(executor, root, red, apply_unit, calls, "apply", peaks)
    # 8. publish
    mixtures: list[StageResult] = []
    k = 0
    for r in signed:
        mine = applied[k : k + len(r.markers)]
        k += len(r.markers)
        if (pub := publish_recipe(root, stage, r, red, mine, red_fp, force)) is not None:
            mixtures.append(pub)
    peaks["driver"] = max(peaks.get("driver", 0.0), peak_rss_mb())
    stats["peak_rss_mb"] = peaks  # per phase: the largest unit's own peak; the driver's since it started
    report = {
        "stage": stage,
        "engine": f"partitioned/{executor.kind}",
        "workers": executor.workers,
        "schema_version": SCHEMA_VERSION,
        "dedup": stats,
        "recipes": {
            m.name: {
                "rows_out": m.rows,
                "drops": m.manifest["drops"],
                "cached": m.cached,
                "input_fingerprint": m.manifest["input_fingerprint"],
            }
            for m in mixtures
        },
        "rows_out": sum(m.rows or 0 for m in mixtures),
        "seconds": round(time.perf_counter() - t0, 3),
        "reduce_fingerprint": red_fp,
    }
    root.write_json(f"{mixture_root(stage)}/{MANIFEST}", report)
    if not cfg.keep_intermediates:
        for d in root.list_all_dirs(f"{wr}/reduce"):
            root.delete_dir(f"{wr}/reduce/{d}")
    log.info("stage %s: %d rows in %d mixture(s), %s", stage, report["rows_out"], len(mixtures), stats)
    return ingested, mixtures, failed


def _gp(rank: int, part: int) -> int:
    return (rank << PART_BITS) | part


def _route(d: str, markers: list[dict[str, Any]], prefix: str) -> dict[int, list[dict[str, Any]]]:
    """Files ``<prefix><unit>/<gpart>.parquet`` of unit markers, grouped by their global partition."""
    out: dict[int, list[dict[str, Any]]] = {}
    for m in markers:
        for f in m["files"]:
            if f["name"].startswith(prefix):
                out.setdefault(int(f["name"].rsplit("/", 1)[1].split(".")[0]), []).append(ref(d, f))
    return {g: sorted(v, key=lambda e: e["name"]) for g, v in sorted(out.items())}


def _run_settled(
    executor: Executor, fn: Any, calls: list[dict[str, Any]], what: str, peaks: dict[str, float]
) -> list[dict[str, Any] | KalmError]:
    """Run ``calls``; a failing unit yields its one-line error in its place instead of failing the others.
    Records and logs the phase's time and the largest peak RSS of its units (each unit measures its own:
    a reused worker's earlier units do not count), and the driver's."""
    if not calls:
        return []
    t0 = time.perf_counter()
    out = executor.map_settled(fn, calls)
    peak = max((m.get("peak_rss_mb", 0.0) for m in out if isinstance(m, dict)), default=0.0)
    # a unit run in this process (one local worker) restarts the window: the driver's peak is the largest seen
    peaks[what] = max(peaks.get(what, 0.0), peak)
    peaks["driver"] = max(peaks.get("driver", 0.0), peak_rss_mb())
    log.info(
        "%s: %d unit(s) in %.1f s on %s x%d; peak RSS %.0f MB per unit, %.0f MB in the driver",
        what,
        len(calls),
        time.perf_counter() - t0,
        executor.kind,
        executor.workers,
        peak,
        peaks["driver"],
    )
    return out


def _units(
    executor: Executor,
    root: DataRoot,
    d: str,
    fn: Any,
    calls: list[dict[str, Any]],
    what: str,
    peaks: dict[str, float],
) -> list[dict[str, Any]]:
    """Run the units without a valid marker; return every unit's marker in call order."""
    res: list[dict[str, Any] | None] = [done(root, d, c["unit"]) for c in calls]
    left = [i for i, m in enumerate(res) if m is None]
    for i, m in zip(left, _run(executor, fn, [calls[i] for i in left], what, peaks), strict=True):
        res[i] = m
    return [m for m in res if m is not None]
