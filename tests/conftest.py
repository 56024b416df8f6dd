"""Shared fixtures: an in-memory word-level tokenizer with a chat template, a tiny Llama config, a tmp cwd.

Nothing is downloaded: the environment below is set before anything imports transformers.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' shard-writing bars too
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tests fork (test_cache); avoid the tokenizers warning
# The real model (SmolLM2-135M-Instruct, converted once from its package's GGUF file) is cached in the repository's
# runs/, not in each test's tmp cwd, so a test session converts it at most once per machine.
os.environ.setdefault("PERSONA_MODEL_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), "runs"))

import pytest  # noqa: E402
import torch  # noqa: E402

from alignment.config import ModelConfig  # noqa: E402

torch.set_num_threads(2)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "i you we they live in lyon paris rome work as a baker nurse pilot like dislike cats dogs tea "
    "coffee rain hello good day hey what where do is your my job home and . , ? !"
).split()
# Each message renders as `<|role|> content <|end|>`; a generation prompt appends `<|assistant|>`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(pad: bool = True):
    """A WordLevel tokenizer over the 8 specials + 39 words (47 ids; <pad> = 0, <s> = 1, </s> = 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # "live ?" -> ["live", "?"]; specials split first
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        **({"pad_token": "<pad>"} if pad else {}),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip themselves where CUDA is absent (CI, this project's CPU machines)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_config():
    """A 2-layer, 32-wide Llama preset (~40k parameters with the tiny vocabulary), fp32 on CPU."""
    return ModelConfig(
        preset="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=64,
        dtype="float32", device="cpu",
    )


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny or 135M models on a shared 2-core machine run several times faster
    than on two under load, and the server's threads=1 sums floats the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test with `tmp_path` as the working directory, so `runs/` lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


REAL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_dir():
    """The cached HF directory of SmolLM2-135M-Instruct (the README's test command installs its package)."""
    from alignment.model_sources import source_dir

    return source_dir(REAL)


@pytest.fixture(scope="session")
def real_lm(real_dir):
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32 on CPU, eval mode, loaded once per test session.
    Shared: a test must not train it or change its config (load its own copy for that)."""
    from alignment.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(REAL)
    model = load_causal_lm(ModelConfig(preset=REAL, dtype="float32", device="cpu"), tokenizer)
    return model, tokenizer
