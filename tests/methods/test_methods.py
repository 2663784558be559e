"""Baseline methods: what each trains (against closed-form counts), forward equivalences, files, errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.methods import METHODS, apply_method, get_method, parse_options
from lorakit.methods.io import CONFIG_NAME, WEIGHTS_NAME, load_method, save_method
from lorakit.methods.prefix import EMBED_ATTR, LAYER_ATTR, attention_modules, needs_labels
from tiny import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

V = 96  # vocabulary of the tiny GPT-2


def gpt2(seed: int = 0, impl: str = "sdpa", init_range: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, initializer_range=init_range, attn_implementation=impl)
    return GPT2LMHeadModel(cfg).eval()


def ids(batch: int = 2, seq: int = 7, vocab: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Small forwards run faster on one thread, and far faster when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- closed-form counts ---------------------------------------------------------------------------------


def gpt2_expected(model: GPT2LMHeadModel, method: str, opts: dict) -> int:
    c = model.config
    d, L = c.n_embd, c.n_layer
    block = 12 * d * d + 13 * d  # ln1, c_attn (d x 3d), c_proj, ln2, c_fc (d x 4d), mlp.c_proj; all biased
    b = opts.get("bottleneck", 16)
    adapter = 2 * d * b + b + d  # down (d x b + b) and up (b x d + d)
    return {
        "full": c.vocab_size * d + c.n_positions * d + L * block + 2 * d,
        "fttop2": 2 * block,
        "bitfit": L * 11 * d + d,  # per block: ln1, c_attn (3d), c_proj, ln2, c_fc (4d), mlp.c_proj; + ln_f
        "adapter_h": L * 2 * adapter,
        "adapter_l": L * (adapter + 2 * d),  # + its LayerNorm
        "adapter_p": L * adapter,
        "prefix_layer": L * 2 * opts.get("length", 10) * d,
        "prefix_embed": (opts.get("lp", 10) + opts.get("li", 10)) * d,
        "lora": L * 2 * 8 * 2 * d,  # q and v slices of c_attn, r = 8: A (8 x d) + B (d x 8) each
    }[method]


# "head" trains a sequence classifier's head: a causal LM has none (test_training covers it on BERT).
LM_METHODS = [m for m in METHODS if m != "head"]


@pytest.mark.parametrize("method", LM_METHODS)
def test_gpt2_trains_exactly_the_closed_form_count(method):
    model = gpt2()
    total_before = n_params(model)
    result = apply_method(model, method)
    assert result.trainable == gpt2_expected(model, method, {})
    assert result.total == n_params(model) == total_before + result.added
    assert result.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Gradients reach exactly the parameters the method reports (and nothing frozen gets one).
    x = ids(vocab=V)
    model(input_ids=x, labels=x).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(result.trainable_names)


def test_which_parameters_each_method_picks():
    names = apply_method(gpt2(), "bitfit").trainable_names
    assert names and all(n.endswith(".bias") for n in names)
    names = apply_method(gpt2(), "fttop2", layers=1).trainable_names
    assert names and all(n.startswith("transformer.h.1.") for n in names)
    names = apply_method(gpt2(), "adapter_h").trainable_names
    assert {n.split(".lorakit_adapter")[0] for n in names} == {
        f"transformer.h.{i}.{s}.c_proj" for i in range(2) for s in ("attn", "mlp")}


def test_bert_counts_include_the_classifier_head():
    model = tiny_bert(num_labels=3)
    c = model.config
    d, L, i = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    head = d * 3 + 3
    block = 4 * (d * d + d) + 2 * d + (d * i + i) + (i * d + d) + 2 * d
    expected = {
        "bitfit": L * (7 * d + i) + 2 * d + head,  # q,k,v,o, 2 LN, ffn in+out; + emb LN, pooler
        "fttop2": 2 * block + head,
        "adapter_l": L * (2 * d * 8 + 8 + 3 * d) + head,
        "prefix_layer": L * 2 * 4 * d + head,
        "prefix_embed": 5 * d + head,
    }
    options = {
        "adapter_l": {"bottleneck": 8}, "prefix_layer": {"length": 4}, "prefix_embed": {"lp": 3, "li": 2},
    }
    for method, count in expected.items():
        model = tiny_bert(num_labels=3)
        result = apply_method(model, method, **options.get(method, {}))
        assert result.trainable == count, method
        assert {"classifier.weight", "classifier.bias"} <= set(result.trainable_names)
    model = tiny_bert(num_labels=3)
    assert "classifier.weight" not in apply_method(model, "adapter_p", train_head=False).trainable_names


def test_llama_counts_gqa_prefix_and_no_bitfit():
    model = tiny_llama()
    x = ids()
    base = model(input_ids=x).logits
    c = model.config
    d, L, i = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)  # GQA: prefixes are per key/value head
    assert kv < d
    assert apply_method(model, "prefix_layer", length=3).trainable == L * 2 * 3 * kv
    # A prefix always takes some attention mass (even zero keys get exp(0)): never the exact base output.
    assert not torch.allclose(model(input_ids=x).logits, base, atol=1e-3)
    block = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    assert apply_method(tiny_llama(), "fttop2").trainable == 2 * block
    with pytest.raises(ConfigError, match="no bias vectors"):
        apply_method(tiny_llama(), "bitfit")


def test_real_smollm2_counts_and_exact_adapter_start(smollm2):
    model, _ = smollm2
    c = model.config
    d, L = c.hidden_size, c.num_hidden_layers
    x = ids(batch=1, seq=6, vocab=1000)
    base = model(input_ids=x).logits
    result = apply_method(model, "adapter_h", bottleneck=8)
    assert result.trainable == L * 2 * (2 * d * 8 + 8 + d)
    assert torch.equal(model(input_ids=x).logits, base)  # up-projections are zero: bit-identical
    with pytest.raises(ConfigError, match="already has method 'adapter_h'"):
        apply_method(model, "prefix_layer")


def test_real_smollm2_prefix_layer_matches_hf_cache(smollm2):
    """GQA (9 query / 3 key-value heads): our prefix equals HF's own KV cache holding the same prefix."""
    model, _ = smollm2
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    x = ids(batch=1, seq=5, vocab=1000)
    result = apply_method(model, "prefix_layer", length=3, init="normal", init_std=1.0)
    assert result.trainable == c.num_hidden_layers * 2 * 3 * kv
    out = model(input_ids=x).logits
    ref = _cache_reference(model, x, torch.ones_like(x))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# -- forward equivalences -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["adapter_h", "adapter_l", "adapter_p"])
@pytest.mark.parametrize("make", [gpt2, tiny_llama, tiny_bert])
def test_zero_up_projection_reproduces_the_base_exactly(make, method):
    model = make()
    x = ids()
    base = model(input_ids=x).logits
    apply_method(model, method, bottleneck=4, activation="gelu")
    assert torch.equal(model(input_ids=x).logits, base)
    randomize_lora(model)  # trained adapters must change the output: the hooks are live
    assert not torch.allclose(model(input_ids=x).logits, base, atol=1e-4)


def _cache_reference(model, x, mask):
    """The base model run with each layer's prefix as a pre-filled HF cache and explicit positions."""
    from lorakit.methods.prefix import _kernel  # noqa: F401  (the model's kernels stay importable)

    prefixes = [getattr(attn, LAYER_ATTR) for _, attn in attention_modules(model)]
    for _, attn in attention_modules(model):
        attn.config = model.config  # route through the plain kernel for the reference run
    cache = DynamicCache(config=model.config)
    b = x.shape[0]
    for layer, p in enumerate(prefixes):
        cache.update(p.key.detach().unsqueeze(0).expand(b, -1, -1, -1),
                     p.value.detach().unsqueeze(0).expand(b, -1, -1, -1), layer)
    length = prefixes[0].length
    full_mask = torch.cat([torch.ones(b, length, dtype=mask.dtype), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x, attention_mask=full_mask, past_key_values=cache, position_ids=positions).logits


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefix_layer_masks(impl):
    torch.manual_seed(3)
    model = gpt2(impl=impl)
    apply_method(model, "prefix_layer", length=4, init="normal", init_std=0.5)
    x = ids(vocab=V)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    out = model(input_ids=x, attention_mask=mask).logits
    # Padding: a padded row's real tokens see exactly what they see unpadded.
    solo = model(input_ids=x[1:, :5]).logits
    torch.testing.assert_close(out[1, :5], solo[0], atol=1e-5, rtol=1e-5)
    # Causality survives the widened mask: changing the last token leaves earlier positions alone.
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % V
    torch.testing.assert_close(model(input_ids=y, attention_mask=mask).logits[0, :-1], out[0, :-1])
    # And it all equals HF's own prefix-in-the-cache computation.
    ref = _cache_reference(model, x, mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :5], ref[1, :5], atol=1e-5, rtol=1e-5)


def test_prefix_layer_bert_padding_and_generation_cache():
    torch.manual_seed(0)
    model = tiny_bert()
    apply_method(model, "prefix_layer", length=2, init="normal", init_std=0.5)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits[0],
                               model(input_ids=x[:1, :4]).logits[0], atol=1e-5, rtol=1e-5)
    lm = gpt2(init_range=0.3)
    apply_method(lm, "prefix_layer", length=3, init="tokens")
    prompt = ids(batch=1, seq=4, vocab=V)
    generated = lm.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):  # no cache: the whole sequence every step
        seq = torch.cat([seq, lm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == seq.tolist()


def test_prefix_embed_inserts_prefix_and_infix_where_they_belong():
    model, base = gpt2(init_range=0.3), gpt2(init_range=0.3)
    apply_method(model, "prefix_embed", lp=3, li=2)
    table = getattr(model, EMBED_ATTR).table.detach()
    wte = base.transformer.wte.weight
    x = ids(seq=8, vocab=V)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    labels = x.clone()
    labels[:, :4] = -100  # a 4-token prompt: the infix goes right after it
    labels[1, 6:] = -100
    out = model(input_ids=x, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 8, V)  # gathered back to the caller's positions
    embeds = torch.cat([table[:3], wte[x[0, :4]], table[3:], wte[x[0, 4:]]])[None]
    ref = base(inputs_embeds=embeds).logits[0]
    # new positions: prompt 3..6, infix 7..8, targets 9..12; the prompt's last token is predicted from 8
    torch.testing.assert_close(out.logits[0], ref[[3, 4, 5, 8, 9, 10, 11, 12]], atol=1e-5, rtol=1e-5)
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(shifted, out.loss)  # the caller's shifted loss is the model's own
    # A trainer that computes the loss itself says where prompts end instead of passing labels.
    assert needs_labels(model) and not needs_labels(gpt2())
    told = model(input_ids=x, attention_mask=mask, lorakit_infix_at=torch.tensor([4, 4])).logits
    torch.testing.assert_close(told, out.logits, atol=0, rtol=0)
    unaware = model(input_ids=x, attention_mask=mask).logits  # no labels: the infix goes at the end
    assert not torch.allclose(unaware[0, 4:], out.logits[0, 4:])


def test_prefix_embed_generation_with_left_padding():
    model, base = gpt2(init_range=0.3), gpt2(init_range=0.3)
    apply_method(model, "prefix_embed", lp=3, li=2)
    table = getattr(model, EMBED_ATTR).table.detach()
    wte = base.transformer.wte.weight
    prompts = ids(seq=5, vocab=V)
    mask = torch.ones_like(prompts)
    prompts[0, :2], mask[0, :2] = 0, 0
    generated = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row in range(2):
        real, new = prompts[row][mask[row].bool()], []
        for _ in range(5):
            so_far = wte[torch.tensor(new, dtype=torch.long)]
            embeds = torch.cat([table[:3], wte[real], table[3:], so_far])[None]
            new.append(int(base(inputs_embeds=embeds).logits[0, -1].argmax()))
        assert generated[row, 5:].tolist() == new


def test_prefix_embed_keeps_cls_first_on_bert(minilm_cls):
    model, tok = minilm_cls
    base_word = model.bert.embeddings.word_embeddings.weight.detach().clone()
    apply_method(model, "prefix_embed", lp=2, li=1)
    table = getattr(model, EMBED_ATTR).table.detach()
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    out = model(**enc).logits
    ids0 = enc["input_ids"][0]
    embeds = torch.cat([base_word[ids0[:1]], table[:2], base_word[ids0[1:]], table[2:]])[None]
    with torch.no_grad():
        hooks = model._forward_pre_hooks.copy()
        model._forward_pre_hooks.clear()  # run the plain model on hand-built embeddings
        try:
            ref = model(inputs_embeds=embeds).logits
        finally:
            model._forward_pre_hooks.update(hooks)
    torch.testing.assert_close(out[:1], ref, atol=1e-5, rtol=1e-5)


# -- files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in LM_METHODS if m != "lora"])
def test_save_load_round_trip(tmp_path, method):
    model = gpt2()
    apply_method(model, method)
    randomize_lora(model, std=0.05)
    x = ids(vocab=V)
    expected = model(input_ids=x).logits
    save_method(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert config["method"] == method and set(config["tensors"]) == set(model.lorakit_method["trainable"])
    fresh = gpt2()
    result = load_method(fresh, tmp_path / "m")
    assert result.method == method and result.options == model.lorakit_method["options"]
    torch.testing.assert_close(fresh(input_ids=x).logits, expected, atol=0, rtol=0)


def test_files_are_checked(tmp_path):
    model = gpt2()
    apply_method(model, "adapter_p", bottleneck=4)
    save_method(model, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("kept")
    save_method(model, tmp_path / "m")  # overwriting replaces each file atomically, keeps other files
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]
    with pytest.raises(AdapterFileError, match="model_type='gpt2', this model has 'llama'"):
        load_method(tiny_llama(), tmp_path / "m")
    with pytest.raises(AdapterFileError, match="hidden_size=64, this model has 32"):
        load_method(tiny_gpt2(), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).write_bytes((tmp_path / "m" / WEIGHTS_NAME).read_bytes()[:-4] + b"xxxx")
    with pytest.raises(AdapterFileError, match="checksum"):
        load_method(gpt2(), tmp_path / "m")
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_method(gpt2(), tmp_path / "nowhere")
    lora = gpt2()
    apply_method(lora, "lora")
    with pytest.raises(ConfigError, match="save_adapter"):
        save_method(lora, tmp_path / "l")


# -- errors and options ---------------------------------------------------------------------------------


def test_clear_errors():
    with pytest.raises(ConfigError, match="unknown method 'adaptr_h'; known: adapter_h, adapter_l, adapter_p"):
        apply_method(gpt2(), "adaptr_h")
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['bottleneck'\].*layers=2"):
        apply_method(gpt2(), "fttop2", bottleneck=4)
    with pytest.raises(ConfigError, match="bottleneck='abc' must be of type int"):
        apply_method(gpt2(), "adapter_h", bottleneck="abc")
    with pytest.raises(ConfigError, match=r"layers must be an integer in \[1, 2\]"):
        apply_method(gpt2(), "fttop2", layers=3)
    with pytest.raises(ConfigError, match="activation must be one of"):
        apply_method(gpt2(), "adapter_l", activation="swish")
    with pytest.raises(ConfigError, match="lp \\+ li must be at least 1"):
        apply_method(gpt2(), "prefix_embed", lp=0, li=0)
    flash = gpt2()
    flash.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        apply_method(flash, "prefix_layer")
    lora = gpt2()
    apply_method(lora, "lora")
    with pytest.raises(ConfigError, match="already has method 'lora'"):
        apply_method(lora, "bitfit")
    with pytest.raises(ConfigError, match="key=value"):
        parse_options(["bottleneck"])
    model = gpt2()
    with pytest.raises(ConfigError, match="exceed the model's 64 positions"):
        apply_method(model, "prefix_embed", lp=10, li=0)
        model(input_ids=ids(seq=60, vocab=V))


def test_cli_options_and_trainer_entries():
    assert parse_options(["bottleneck=32", "activation=gelu", "train-head=false"]) == {
        "bottleneck": "32", "activation": "gelu", "train_head": "false"}
    model = tiny_bert()
    result = apply_method(model, "adapter_h", **parse_options(["bottleneck=8", "train_head=no"]))
    assert result.options == {"bottleneck": 8, "activation": "relu", "train_head": False}
    assert "classifier.weight" not in result.trainable_names
    cfg = SimpleNamespace(method="prefix_layer", method_options=["length=2", "init=normal"])
    out = get_method("prefix_layer").prepare_for_training(gpt2(), cfg)
    assert out.trainable == 2 * 2 * 2 * 64
    bitfit = get_method("bitfit").prepare_for_training(gpt2(), SimpleNamespace())  # no options: the defaults
    assert bitfit.trainable == gpt2_expected(gpt2(), "bitfit", {})
