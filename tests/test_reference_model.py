"""Tests of the reference Transformers (fusedformer.reference): shapes and presets, causal and
padding masks, sinusoidal encodings, label smoothing, KV-cache decoding, weight tying, short
training runs, block-level parity with torch.nn's Transformer layers, and bad-input errors.

Everything runs in float32 on the CPU with tiny models; the whole file takes seconds.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FLOOR

from fusedformer.reference import (
    GPT,
    PRESETS,
    DecoderCache,
    EncoderDecoder,
    EncoderDecoderConfig,
    GPTConfig,
    causal_mask,
    config_from_preset,
    label_smoothed_cross_entropy,
    sinusoidal_positions,
    smoothed_targets,
)

# float32 floor of the shared table: reordered sums (cache vs recompute, batch vs alone,
# ours vs torch.nn) differ by ~1e-6 on these O(1) logits.
ATOL = RTOL = FLOOR[torch.float32]
PAD, BOS, EOS = 0, 1, 2  # the EncoderDecoderConfig defaults
FIRST_WORD = 3  # first id that is not a special token


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one intra-op thread: the models are tiny, so threads add only
    overhead, and on a busy 2-core machine their spin-waits dominate (measured with a load
    average of 4.7: the file took 3.6 s on 1 thread, 51 s on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL,
                 rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def tiny_gpt(**overrides) -> GPT:
    return GPT.from_preset("gpt-tiny", **overrides).eval()


def tiny_seq2seq(**overrides) -> EncoderDecoder:
    return EncoderDecoder.from_preset("transformer-tiny", **overrides).eval()


def words(*shape: int, vocab: int = 64) -> torch.Tensor:
    """Random ids that are not PAD, BOS or EOS."""
    return torch.randint(FIRST_WORD, vocab, shape)


def pad_right(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """(B, max_len) from 1-D rows of different lengths."""
    width = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (0, width - len(r)), value=value) for r in rows])


# ---------------------------------------------------------------------------------------------
# Presets and shapes
# ---------------------------------------------------------------------------------------------


def test_preset_models_give_logits_of_shape_batch_time_vocab():
    torch.manual_seed(0)
    lm = tiny_gpt()
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = lm(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    assert lm(idx[:, :1])[0].shape == (3, 1, 256)  # T = 1
    assert lm(torch.randint(0, 256, (1, 64)))[0].shape == (1, 64, 256)  # T = block_size

    model = tiny_seq2seq()
    src, tgt_in = words(2, 7), words(2, 5)
    memory, src_mask = model.encode(src)
    assert memory.shape == (2, 7, 32) and src_mask.shape == (2, 7) and src_mask.all()
    logits, loss = model(src, tgt_in)
    assert logits.shape == (2, 5, 64) and loss is None


def test_gpt2_124m_has_124m_parameters_with_tied_embeddings():
    with torch.device("meta"):
        model = GPT.from_preset("gpt2-124m")
    C, V, L, ctx = 768, 50257, 12, 1024
    per_block = (2 * 2 * C                  # ln_1, ln_2
                 + C * 3 * C + 3 * C        # attn.c_attn
                 + C * C + C                # attn.c_proj
                 + C * 4 * C + 4 * C        # mlp.c_fc
                 + 4 * C * C + C)           # mlp.c_proj
    expected = V * C + ctx * C + L * per_block + 2 * C  # wte (= lm_head), wpe, blocks, ln_f
    assert sum(p.numel() for p in model.parameters()) == expected == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_transformer_base_has_about_60m_parameters_with_shared_embeddings():
    with torch.device("meta"):
        model = EncoderDecoder.from_preset("transformer-base")
    C, d_ff, V = 512, 2048, 32000
    attn = 4 * (C * C + C)
    ffn = C * d_ff + d_ff + d_ff * C + C
    norm = 2 * C
    expected = V * C + 6 * (attn + ffn + 2 * norm) + 6 * (2 * attn + ffn + 3 * norm)
    assert sum(p.numel() for p in model.parameters()) == expected == 60_522_496
    assert model.src_embed.weight is model.tgt_embed.weight is model.lm_head.weight


def test_config_from_preset_returns_a_copy_with_overrides():
    config = config_from_preset("gpt-tiny", dropout=0.1)
    assert config.dropout == 0.1 and PRESETS["gpt-tiny"].dropout == 0.0
    assert GPT.from_preset("gpt-tiny", n_layer=1).config.n_layer == 1
    assert EncoderDecoder.from_preset("transformer-tiny", d_ff=64).config.d_ff == 64
    base = config_from_preset("transformer-base")
    assert (base.d_model, base.n_head, base.n_encoder_layers, base.n_decoder_layers,
            base.d_ff, base.dropout) == (512, 8, 6, 6, 2048, 0.1)


def test_state_dict_uses_the_documented_parameter_names():
    gpt_keys = set(tiny_gpt(n_layer=1).state_dict())
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    assert gpt_keys == ({"transformer.wte.weight", "transformer.wpe.weight",
                         "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}
                        | {f"transformer.h.0.{name}" for name in block})

    keys = set(tiny_seq2seq(n_encoder_layers=1, n_decoder_layers=1).state_dict())
    attn = [f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
            for w in ("weight", "bias")]
    ffn = ["ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias"]
    norms = lambda n: [f"norm{i}.{w}" for i in range(1, n + 1) for w in ("weight", "bias")]
    expected = {"src_embed.weight", "tgt_embed.weight", "lm_head.weight"}
    expected |= {f"encoder.layers.0.{k}" for k in
                 [f"self_attn.{a}" for a in attn] + ffn + norms(2)}
    expected |= {f"decoder.layers.0.{k}" for k in
                 [f"self_attn.{a}" for a in attn] + [f"cross_attn.{a}" for a in attn]
                 + ffn + norms(3)}
    assert keys == expected


def test_gpt_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256))
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert abs(block.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert (block.attn.c_attn.bias == 0).all()


# ---------------------------------------------------------------------------------------------
# Causality and padding
# ---------------------------------------------------------------------------------------------


def test_causal_mask_position_3_cannot_see_4_and_5():
    mask = causal_mask(6, 6)
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert torch.equal(mask, torch.ones(6, 6, dtype=torch.bool).tril())
    # Two queries at the end of six keys (a KV cache): absolute positions 4 and 5.
    assert causal_mask(2, 6).tolist() == [[True] * 5 + [False], [True] * 6]


def test_gpt_position_3_cannot_see_4_and_5():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 256, (2, 6))
    changed = idx.clone()
    changed[:, 4:] = (idx[:, 4:] + 1) % 256
    before, after = model(idx)[0], model(changed)[0]
    assert_close(after[:, :4], before[:, :4], atol=0, rtol=0)
    assert not torch.allclose(after[:, 4:], before[:, 4:])


def test_gpt_logits_of_a_prefix_do_not_depend_on_what_follows():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 256, (2, 13))
    full = model(idx)[0]
    for k in (1, 5, 12):
        assert_close(model(idx[:, :k])[0], full[:, :k])


def test_decoder_position_3_cannot_see_4_and_5():
    torch.manual_seed(0)
    model = tiny_seq2seq()
    src, tgt_in = words(2, 7), words(2, 6)
    changed = tgt_in.clone()
    changed[:, 4:] = FIRST_WORD + (tgt_in[:, 4:] + 1 - FIRST_WORD) % (64 - FIRST_WORD)
    before, after = model(src, tgt_in)[0], model(src, changed)[0]
    assert_close(after[:, :4], before[:, :4], atol=0, rtol=0)
    assert not torch.allclose(after[:, 4:], before[:, 4:])


def test_gpt_padded_batch_equals_each_sequence_alone():
    # "This is a test" (4), "This is a new test" (5), "This is it" (3), padded to 5.
    torch.manual_seed(0)
    model = tiny_gpt()
    rows = [torch.randint(1, 256, (n,)) for n in (4, 5, 3)]
    idx = pad_right(rows, value=0)
    attention_mask = pad_right([torch.ones(len(r), dtype=torch.bool) for r in rows], False)
    targets = pad_right([torch.roll(r, -1) for r in rows], value=-100)
    logits, loss = model(idx, targets, attention_mask=attention_mask)
    alone_losses = []
    for b, row in enumerate(rows):
        alone, _ = model(row[None])
        assert_close(logits[b, :len(row)], alone[0])
        alone_losses.append(F.cross_entropy(alone[0], torch.roll(row, -1), reduction="sum"))
    assert_close(loss, torch.stack(alone_losses).sum() / sum(len(r) for r in rows))


def test_gpt_attention_mask_hides_keys_as_if_they_were_deleted():
    # With the position table zeroed, masking key 2 must equal deleting token 2. (Right padding
    # alone cannot test the mask: the causal mask already hides keys after each query.)
    torch.manual_seed(0)
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    idx = torch.randint(0, 256, (1, 7))
    attention_mask = torch.ones(1, 7, dtype=torch.bool)
    attention_mask[0, 2] = False
    kept = [0, 1, 3, 4, 5, 6]
    masked, _ = model(idx, attention_mask=attention_mask)
    deleted, _ = model(idx[:, kept])
    assert_close(masked[:, kept], deleted)


def test_seq2seq_padded_batch_equals_each_pair_alone():
    torch.manual_seed(0)
    model = tiny_seq2seq()
    srcs = [words(n) for n in (4, 5, 3)]
    tgts = [torch.cat([torch.tensor([BOS]), words(n - 1)]) for n in (3, 5, 4)]
    src, tgt_in = pad_right(srcs, PAD), pad_right(tgts, PAD)
    memory, src_mask = model.encode(src)
    logits = model.decode(tgt_in, memory, src_mask)
    assert src_mask.tolist() == (src != PAD).tolist()
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        memory_alone, _ = model.encode(s[None])
        assert_close(memory[b, :len(s)], memory_alone[0])
        assert_close(logits[b, :len(t)], model(s[None], t[None])[0][0])


def test_seq2seq_pad_tokens_are_invisible_wherever_they_sit():
    # Pads mid-sequence: changing the pad embedding must not move any real token's output.
    torch.manual_seed(0)
    model = tiny_seq2seq(share_embeddings=False)
    src = torch.tensor([[5, PAD, 6, 7, PAD], [8, 9, 10, 11, 12]])
    tgt_in = torch.tensor([[BOS, 13, PAD, 14], [BOS, PAD, 15, PAD]])
    before_memory, _ = model.encode(src)
    before = model(src, tgt_in)[0]
    with torch.no_grad():
        model.src_embed.weight[PAD].normal_()
        model.tgt_embed.weight[PAD].normal_()
    after_memory, _ = model.encode(src)
    after = model(src, tgt_in)[0]
    assert_close(after_memory[src != PAD], before_memory[src != PAD])
    assert_close(after[tgt_in != PAD], before[tgt_in != PAD])
    assert not torch.allclose(after[tgt_in == PAD], before[tgt_in == PAD])


def test_fully_masked_rows_give_zeros_not_nan_and_finite_gradients():
    torch.manual_seed(0)
    lm = tiny_gpt()
    attn = lm.transformer.h[0].attn
    y, _ = attn(torch.randn(2, 3, 64), torch.zeros(3, 3, dtype=torch.bool))
    assert_close(y, attn.c_proj.bias.expand(2, 3, 64))  # attention output 0, then c_proj

    idx = torch.randint(0, 256, (2, 5))
    attention_mask = torch.ones(2, 5, dtype=torch.bool)
    attention_mask[1] = False  # every key of row 1 is padding
    logits, loss = lm(idx, idx, attention_mask=attention_mask)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters())

    model = tiny_seq2seq()
    src = torch.tensor([[5, 6, 7], [PAD, PAD, PAD]])
    logits, loss = model(src, torch.tensor([[BOS, 9], [BOS, 9]]), torch.tensor([[9, EOS]] * 2))
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_is_active_in_training_mode_only():
    torch.manual_seed(0)
    model = GPT.from_preset("gpt-tiny", dropout=0.5)
    idx = torch.randint(0, 256, (2, 8))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# ---------------------------------------------------------------------------------------------
# Parity with torch.nn's Transformer layers (an implementation we did not write)
# ---------------------------------------------------------------------------------------------


def load_torch_attention(theirs: nn.MultiheadAttention, q_proj: nn.Linear, k_proj: nn.Linear,
                         v_proj: nn.Linear, out_proj: nn.Linear) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([q_proj.weight, k_proj.weight, v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]))
        theirs.out_proj.weight.copy_(out_proj.weight)
        theirs.out_proj.bias.copy_(out_proj.bias)


def test_gpt_block_equals_torch_pre_ln_encoder_layer_with_causal_mask():
    torch.manual_seed(0)
    block = tiny_gpt().transformer.h[0]
    C = 64
    theirs = nn.TransformerEncoderLayer(C, nhead=4, dim_feedforward=4 * C, dropout=0.0,
                                        activation="gelu", batch_first=True, norm_first=True)
    with torch.no_grad():  # c_attn and in_proj both stack q, k, v along the output dimension
        theirs.self_attn.in_proj_weight.copy_(block.attn.c_attn.weight)
        theirs.self_attn.in_proj_bias.copy_(block.attn.c_attn.bias)
        theirs.self_attn.out_proj.load_state_dict(block.attn.c_proj.state_dict())
    theirs.norm1.load_state_dict(block.ln_1.state_dict())
    theirs.norm2.load_state_dict(block.ln_2.state_dict())
    theirs.linear1.load_state_dict(block.mlp.c_fc.state_dict())
    theirs.linear2.load_state_dict(block.mlp.c_proj.state_dict())

    x = torch.randn(2, 11, C)
    ours, _ = block(x, causal_mask(11, 11))
    expected = theirs(x, src_mask=~causal_mask(11, 11), is_causal=True)
    assert_close(ours, expected)


def test_post_ln_layers_equal_torch_transformer_layers():
    torch.manual_seed(0)
    model = tiny_seq2seq()
    C, d_ff = 32, 128
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    kwargs = dict(nhead=4, dim_feedforward=d_ff, dropout=0.0, activation="relu",
                  batch_first=True, norm_first=False)
    torch_enc = nn.TransformerEncoderLayer(C, **kwargs)
    torch_dec = nn.TransformerDecoderLayer(C, **kwargs)
    for ours, theirs in ((enc, torch_enc), (dec, torch_dec)):
        sa = ours.self_attn
        load_torch_attention(theirs.self_attn, sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj)
        theirs.linear1.load_state_dict(ours.ffn.fc1.state_dict())
        theirs.linear2.load_state_dict(ours.ffn.fc2.state_dict())
        theirs.norm1.load_state_dict(ours.norm1.state_dict())
        theirs.norm2.load_state_dict(ours.norm2.state_dict())
    ca = dec.cross_attn
    load_torch_attention(torch_dec.multihead_attn, ca.q_proj, ca.k_proj, ca.v_proj, ca.out_proj)
    torch_dec.norm3.load_state_dict(dec.norm3.state_dict())

    x, y = torch.randn(3, 6, C), torch.randn(3, 5, C)
    src_mask = torch.ones(3, 6, dtype=torch.bool)
    src_mask[0, 4:] = False
    src_mask[2, 3:] = False
    memory = enc(x, src_mask[:, None, None, :])
    expected = torch_enc(x, src_key_padding_mask=~src_mask)
    assert_close(memory, expected)

    cross_kv = dec.cross_attn.project_kv(memory)
    ours, _ = dec(y, causal_mask(5, 5), cross_kv, src_mask[:, None, None, :])
    theirs = torch_dec(y, memory, tgt_mask=~causal_mask(5, 5),
                       memory_key_padding_mask=~src_mask, tgt_is_causal=True)
    assert_close(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Sinusoidal positions
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_positions_match_the_seed_values_for_d_4():
    pe = sinusoidal_positions(3, 4)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                             [0.841471, 0.540302, 0.0099998, 0.99995],
                             [0.909297, -0.416147, 0.0199987, 0.99980]])
    assert pe.dtype == torch.float32
    assert_close(pe, expected, atol=1e-5, rtol=0)
    assert_close(sinusoidal_positions(2, 4, offset=1), pe[1:], atol=0, rtol=0)


def test_sinusoidal_positions_follow_the_formula_at_any_length():
    d = 6
    pe = sinusoidal_positions(6001, d, dtype=torch.float64)  # past the default max_len 5000
    for pos in (0, 7, 4999, 6000):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)
    assert pe.abs().max() <= 1.0
    odd = sinusoidal_positions(4, 5, dtype=torch.float64)  # an odd width ends on a sine
    assert odd[:, 4].tolist() == pytest.approx([math.sin(p / 10000 ** (4 / 5)) for p in range(4)])


# ---------------------------------------------------------------------------------------------
# Label smoothing
# ---------------------------------------------------------------------------------------------


def test_smoothed_targets_seed_vs_torch_for_eps_0_1_and_3_classes():
    gold = torch.tensor([0])
    assert_close(smoothed_targets(gold, 3, 0.1, "seed"), torch.tensor([[0.9, 0.05, 0.05]]))
    assert_close(smoothed_targets(gold, 3, 0.1, "torch"),
                 torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]]))
    assert_close(smoothed_targets(gold, 3, 0.1, "torch"),
                 torch.tensor([[0.9333, 0.0333, 0.0333]]), atol=1e-4, rtol=0)
    rows = smoothed_targets(torch.randint(0, 11, (4, 5)), 11, 0.2)
    assert rows.shape == (4, 5, 11)
    assert_close(rows.sum(-1), torch.ones(4, 5))


def test_torch_kind_loss_equals_f_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, 1] = targets[2, 4] = -100
    ours = label_smoothed_cross_entropy(logits, targets, 0.1, kind="torch")
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1),
                               ignore_index=-100, label_smoothing=0.1)
    assert_close(ours, expected)


def test_seed_kind_loss_equals_hand_computed_cross_entropy_and_kl():
    # Worked example: logits (2, 1, 0.1), gold 0, eps 0.1 -> targets (0.9, 0.05, 0.05).
    logits = torch.tensor([[2.0, 1.0, 0.1]])
    log_z = math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.1))
    by_hand = -(0.9 * (2.0 - log_z) + 0.05 * (1.0 - log_z) + 0.05 * (0.1 - log_z))
    loss = label_smoothed_cross_entropy(logits, torch.tensor([0]), 0.1)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)

    torch.manual_seed(0)
    V, eps = 9, 0.2
    logits = torch.randn(12, V)
    targets = torch.randint(0, V, (12,))
    targets[3] = -100
    keep = targets != -100
    log_p = F.log_softmax(logits[keep], dim=-1)
    gold = log_p.gather(1, targets[keep, None])[:, 0]
    closed_form = -((1 - eps) * gold + eps / (V - 1) * (log_p.sum(-1) - gold)).mean()
    q = smoothed_targets(targets[keep], V, eps)
    kl_plus_entropy = (F.kl_div(log_p, q, reduction="none").sum(-1)
                       - (q * q.log()).sum(-1)).mean()
    loss = label_smoothed_cross_entropy(logits, targets, eps)
    assert_close(loss, closed_form)
    assert_close(loss, kl_plus_entropy)


def test_zero_smoothing_is_plain_cross_entropy_for_both_kinds():
    torch.manual_seed(0)
    logits, targets = torch.randn(10, 5), torch.randint(0, 5, (10,))
    for kind in ("seed", "torch"):
        assert_close(label_smoothed_cross_entropy(logits, targets, 0.0, kind=kind),
                     F.cross_entropy(logits, targets))


def test_seq2seq_loss_smooths_and_ignores_padding():
    torch.manual_seed(0)
    model = tiny_seq2seq()
    src = words(2, 6)
    tgt_in = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, PAD, PAD]])
    targets = torch.tensor([[5, 6, 7, EOS], [8, EOS, PAD, PAD]])
    logits, loss = model(src, tgt_in, targets, label_smoothing=0.1)
    counted = targets.masked_fill(targets == PAD, -100)
    assert_close(loss, label_smoothed_cross_entropy(logits, counted, 0.1, kind="seed"))
    _, torch_loss = model(src, tgt_in, targets, label_smoothing=0.1, smoothing="torch")
    assert_close(torch_loss, F.cross_entropy(logits.reshape(-1, 64), counted.reshape(-1),
                                             label_smoothing=0.1))


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


def test_gpt_cached_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 256, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[0, 1] = False  # a masked key inside the cached prefix
    full, _ = model(idx, attention_mask=attention_mask)

    pieces, past, start = [], None, 0
    for stop in (5, 8, 9, 10, 11, 12):  # a prefill, a chunk of 3, then single tokens
        logits, _, past = model(idx[:, start:stop], attention_mask=attention_mask[:, :stop],
                                past_key_values=past, use_cache=True)
        pieces.append(logits)
        start = stop
    assert len(past) == 2 and past[0][0].shape == (2, 4, 12, 16)
    assert_close(torch.cat(pieces, dim=1), full)


def test_decoder_cached_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = tiny_seq2seq()
    src = pad_right([words(6), words(4)], PAD)
    tgt_in = torch.tensor([[BOS, 7, 8, 9, 10, 11], [BOS, 12, 13, PAD, PAD, PAD]])
    memory, src_mask = model.encode(src)
    full = model.decode(tgt_in, memory, src_mask)

    pieces, cache = [], None
    for start, stop in ((0, 2), (2, 3), (3, 4), (4, 6)):
        logits, cache = model.decode(tgt_in[:, start:stop], memory, src_mask, past=cache,
                                     use_cache=True)
        pieces.append(logits)
    assert isinstance(cache, DecoderCache) and cache.tgt_mask.tolist() == (tgt_in != PAD).tolist()
    assert cache.self_kv[0][0].shape == (2, 4, 6, 8) and cache.cross_kv[0][0].shape == (2, 4, 6, 8)
    assert_close(torch.cat(pieces, dim=1), full)


def test_gpt_generation_without_cache_crops_to_block_size():
    torch.manual_seed(0)
    model = tiny_gpt()
    prompt = torch.randint(0, 256, (1, 60))
    out = model.generate(prompt, 10, use_cache=False)
    assert out.shape == (1, 70)
    assert torch.equal(out[:, :64], model.generate(prompt, 4, use_cache=True))


# ---------------------------------------------------------------------------------------------
# Weight tying
# ---------------------------------------------------------------------------------------------


def test_gpt_tied_weights_share_storage_and_sum_both_gradients():
    torch.manual_seed(0)
    tied = tiny_gpt()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()

    untied = tiny_gpt()
    untied.load_state_dict(tied.state_dict())
    untied.lm_head.weight = nn.Parameter(tied.lm_head.weight.detach().clone())
    idx = torch.randint(0, 256, (2, 9))
    for model in (tied, untied):
        model(idx, idx)[1].backward()
    as_embedding, as_head = untied.transformer.wte.weight.grad, untied.lm_head.weight.grad
    assert as_embedding.abs().sum() > 0 and as_head.abs().sum() > 0
    assert_close(tied.lm_head.weight.grad, as_embedding + as_head)


def test_seq2seq_shared_embeddings_sum_all_three_gradients():
    torch.manual_seed(0)
    shared = tiny_seq2seq()
    assert shared.src_embed.weight is shared.tgt_embed.weight is shared.lm_head.weight
    separate = tiny_seq2seq(share_embeddings=False)
    separate.load_state_dict(shared.state_dict())
    assert separate.src_embed.weight is not separate.tgt_embed.weight

    src, tgt_in, targets = words(2, 5), words(2, 4), words(2, 4)
    for model in (shared, separate):
        model(src, tgt_in, targets)[1].backward()
    grads = [separate.src_embed.weight.grad, separate.tgt_embed.weight.grad,
             separate.lm_head.weight.grad]
    assert all(g.abs().sum() > 0 for g in grads)
    assert_close(shared.src_embed.weight.grad, sum(grads))


# ---------------------------------------------------------------------------------------------
# Training sanity, then greedy decoding of what was learned. Random models make poor decoding
# tests (greedy output collapses to one repeated token), so these decode memorised data.
# ---------------------------------------------------------------------------------------------


def train(model: nn.Module, steps: int, loss_fn) -> list[float]:
    """`steps` Adam steps (lr 1e-2) on the loss `loss_fn(model)`; returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained_gpt() -> tuple[GPT, torch.Tensor, list[float]]:
    """gpt-tiny after 50 steps on one fixed batch of 3 random byte sequences of length 25."""
    torch.manual_seed(0)
    model = GPT.from_preset("gpt-tiny")
    batch = torch.randint(0, 256, (3, 25))
    losses = train(model, 50, lambda m: m(batch[:, :-1], batch[:, 1:])[1])
    return model.eval(), batch, losses


@pytest.fixture(scope="module")
def trained_copier() -> tuple[EncoderDecoder, list[torch.Tensor], list[float]]:
    """transformer-tiny after 40 steps on copying 8 fixed sources of lengths 3 to 6."""
    torch.manual_seed(0)
    model = EncoderDecoder.from_preset("transformer-tiny")
    sources = [words(n) for n in (3, 6, 4, 5, 6, 3, 5, 4)]
    src = pad_right(sources, PAD)
    tgt_in = pad_right([F.pad(s, (1, 0), value=BOS) for s in sources], PAD)   # BOS y1 .. yn
    targets = pad_right([F.pad(s, (0, 1), value=EOS) for s in sources], PAD)  # y1 .. yn EOS
    losses = train(model, 40, lambda m: m(src, tgt_in, targets, label_smoothing=0.1)[1])
    return model.eval(), sources, losses


def test_gpt_tiny_overfits_a_fixed_batch(trained_gpt):
    model, batch, losses = trained_gpt
    assert losses[-1] < 0.5 * losses[0]
    continued = model.generate(batch[:, :4], 21)
    recalled = (continued == batch).float().mean().item()
    assert recalled > 0.9, f"greedy decoding recalls only {recalled:.0%} of the batch"


def test_gpt_greedy_generation_is_the_same_with_and_without_cache(trained_gpt):
    model, batch, _ = trained_gpt
    prompt = batch[:, :4]
    cached = model.generate(prompt, 21)
    assert cached.shape == (3, 25) and torch.equal(cached[:, :4], prompt)
    assert torch.equal(model.generate(prompt, 21, use_cache=False), cached)

    # Use a token that row 0 emits as EOS: row 0 stops there and is padded with EOS.
    eos = cached[0, 6].item()
    stops = [4 + (row[4:] == eos).nonzero()[0].item() if (row[4:] == eos).any() else None
             for row in cached]
    expected = cached.clone()
    for row, stop in zip(expected, stops):
        if stop is not None:
            row[stop + 1:] = eos
    if None not in stops:
        expected = expected[:, :max(stops) + 1]
    assert not torch.equal(expected, cached)
    for use_cache in (True, False):
        assert torch.equal(model.generate(prompt, 21, use_cache, eos_token_id=eos), expected)


def test_transformer_tiny_learns_to_copy(trained_copier):
    model, sources, losses = trained_copier
    assert losses[-1] < 0.5 * losses[0]
    out = model.greedy_decode(pad_right(sources, PAD), 10)
    expected = pad_right([torch.cat([torch.tensor([BOS]), s, torch.tensor([EOS])])
                          for s in sources], PAD)
    width = min(out.size(1), expected.size(1))
    real = expected[:, :width] != PAD
    copied = (out[:, :width] == expected[:, :width])[real].float().mean().item()
    assert copied > 0.9, f"only {copied:.0%} of the tokens (EOS included) copied"


def test_seq2seq_greedy_decoding_is_the_same_with_and_without_cache(trained_copier):
    model, sources, _ = trained_copier
    src = pad_right(sources, PAD)
    out = model.greedy_decode(src, 10)
    assert torch.equal(model.greedy_decode(src, 10, use_cache=False), out)
    assert (out[:, 0] == BOS).all()
    ends = []
    for row in out:
        assert (row == EOS).any(), "the trained copier ends every row"
        end = (row == EOS).nonzero()[0].item()
        assert (row[end + 1:] == PAD).all()
        ends.append(end)
    assert len(set(ends)) > 1  # rows ended at different steps
    assert out.size(1) == max(ends) + 1 < 11  # decoding stopped once every row had ended


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return tiny_gpt()


@pytest.fixture(scope="module")
def seq2seq() -> EncoderDecoder:
    torch.manual_seed(0)
    return tiny_seq2seq(max_len=8)


IDX = torch.arange(16).reshape(2, 8)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(IDX.float()), TypeError, r"idx must be int64 \(torch.long\) token ids, got "
                                          r"torch.float32"),
    (lambda m: m(IDX[0]), ValueError, r"idx must be 2-D \(B, T\) with T >= 1, got shape \(8,\)"),
    (lambda m: m(IDX[:, :0]), ValueError, r"idx must be 2-D .* got shape \(2, 0\)"),
    (lambda m: m(torch.zeros(1, 65, dtype=torch.long)), ValueError, r"exceed block_size=64"),
    (lambda m: m(IDX + 250), ValueError, r"idx must hold ids in \[0, 256\), got values in"),
    (lambda m: m(IDX, IDX[:, :4]), ValueError, r"targets must have the shape of idx \(2, 8\)"),
    (lambda m: m(IDX, IDX.int()), TypeError, r"targets must be int64"),
    (lambda m: m(IDX, attention_mask=torch.ones(2, 8)), TypeError,
     r"attention_mask must be bool"),
    (lambda m: m(IDX, attention_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"attention_mask must have shape \(2, 8\)"),
    (lambda m: m(IDX, past_key_values=[]), ValueError,
     r"past_key_values must be a list of 2 \(k, v\) pairs"),
    (lambda m: m(IDX, past_key_values=[(torch.zeros(2, 4, 3, 16),) * 2,
                                       (torch.zeros(2, 4, 2, 16),) * 2]),
     ValueError, r"past_key_values\[1\] must be a \(k, v\) pair of shape \(2, 4, 3, 16\)"),
    (lambda m: m(torch.zeros(1, 8, dtype=torch.long),
                 past_key_values=[(torch.zeros(1, 4, 60, 16),) * 2] * 2),
     ValueError, r"60 cached \+ 8 new positions exceed block_size=64"),
    (lambda m: m.generate(IDX, 60), ValueError, r"pass use_cache=False"),
    (lambda m: m.generate(IDX, -1), ValueError, r"max_new_tokens must be an int >= 0"),
    (lambda m: m.generate(IDX, 3, eos_token_id=256), ValueError,
     r"eos_token_id must be an int in \[0, 256\)"),
])
def test_gpt_rejects_bad_inputs(gpt, call, error, match):
    with pytest.raises(error, match=match):
        call(gpt)


SRC = torch.arange(FIRST_WORD, FIRST_WORD + 10).reshape(2, 5)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.encode(SRC.int()), TypeError, r"src must be int64"),
    (lambda m: m.encode(SRC + 64), ValueError, r"src must hold ids in \[0, 64\)"),
    (lambda m: m.encode(torch.ones(1, 9, dtype=torch.long)), ValueError,
     r"src is too long: 9 positions exceed config.max_len=8"),
    (lambda m: m(SRC, SRC[:1]), ValueError,
     r"memory must have shape \(B, S, C\) = \(1, S, 32\) to match tgt_in"),
    (lambda m: m(SRC, SRC, SRC[:, :2]), ValueError, r"targets must have the shape of tgt_in"),
    (lambda m: m(SRC, SRC, SRC, label_smoothing=1.5), ValueError,
     r"label smoothing epsilon must be in \[0, 1\], got 1.5"),
    (lambda m: m(SRC, SRC, SRC, smoothing="fairseq"), ValueError,
     r"smoothing kind must be 'seed' or 'torch', got 'fairseq'"),
    (lambda m: m.decode(SRC, *m.encode(SRC), past=[]), TypeError,
     r"past must be a DecoderCache"),
    (lambda m: m.decode(SRC, m.encode(SRC)[0], (SRC != PAD).float()), TypeError,
     r"src_mask must be bool"),
    (lambda m: m.greedy_decode(SRC, 9), ValueError, r"max_len is too long"),
])
def test_seq2seq_rejects_bad_inputs(seq2seq, call, error, match):
    with pytest.raises(error, match=match):
        call(seq2seq)


@pytest.mark.parametrize("call, error, match", [
    (lambda: GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=16),
     ValueError, r"n_embd must be divisible by n_head, got n_embd=16, n_head=3"),
    (lambda: GPTConfig(vocab_size=10, block_size=0, n_layer=1, n_head=1, n_embd=16),
     ValueError, r"block_size must be >= 1, got 0"),
    (lambda: GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=16,
                       dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: EncoderDecoderConfig(src_vocab_size=10, tgt_vocab_size=12), ValueError,
     r"share_embeddings=True needs src_vocab_size == tgt_vocab_size, got 10 and 12"),
    (lambda: EncoderDecoderConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=30),
     ValueError, r"d_model must be divisible by n_head, got d_model=30, n_head=8"),
    (lambda: EncoderDecoderConfig(src_vocab_size=10, tgt_vocab_size=10, eos_token_id=0),
     ValueError, r"must be distinct"),
    (lambda: EncoderDecoderConfig(src_vocab_size=10, tgt_vocab_size=10, pad_token_id=10),
     ValueError, r"pad_token_id must be in \[0, 10\)"),
    (lambda: config_from_preset("gpt3"), ValueError,
     r"unknown preset 'gpt3'; known presets: gpt2-124m, gpt-tiny, transformer-base, "
     r"transformer-tiny"),
    (lambda: GPT.from_preset("transformer-tiny"), ValueError,
     r"configures an EncoderDecoder, not a GPT; GPT presets: gpt2-124m, gpt-tiny"),
    (lambda: EncoderDecoder.from_preset("gpt-tiny"), ValueError, r"configures a GPT"),
    (lambda: GPT(config_from_preset("transformer-tiny")), TypeError,
     r"config must be a GPTConfig, got EncoderDecoderConfig"),
    (lambda: smoothed_targets(torch.tensor([3]), 3, 0.1), ValueError,
     r"targets must hold ids in \[0, 3\), got values in \[3, 3\]"),
    (lambda: smoothed_targets(torch.tensor([0]), 1, 0.1), ValueError, r"needs V >= 2, got V=1"),
    (lambda: label_smoothed_cross_entropy(torch.zeros(4, 3), torch.zeros(4), 0.1), TypeError,
     r"targets must be int64"),
    (lambda: causal_mask(5, 3), ValueError, r"t_q <= t_k"),
    (lambda: sinusoidal_positions(-1, 4), ValueError, r"T must be an int >= 0, got -1"),
])
def test_configs_and_helpers_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
