"""Causal LMs built from a config: seeded init, the loss against a plain-torch reference, sizes, save and load.

.venv/bin/python -m pytest -q tests/test_model.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from p2pfed.config import ModelConfig
from p2pfed.errors import ConfigError
from p2pfed.model import PRESETS, build_model, count_parameters

VOCAB = 256
ARCHS = ["llama", "gpt2"]


def _expected_parameters(arch: str, *, hidden: int, layers: int, inter: int, seq_len: int) -> int:
    """Parameter count written out from the two architectures (untied head, no attention biases in Llama)."""
    embeddings_and_head = 2 * VOCAB * hidden
    if arch == "llama":
        attention = 4 * hidden * hidden  # q, k, v, o; as many key/value heads as query heads
        mlp = 3 * hidden * inter  # gate, up, down
        norms = 2 * hidden
        return embeddings_and_head + layers * (attention + mlp + norms) + hidden  # + final RMSNorm
    attention = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)  # c_attn, c_proj with biases
    mlp = (hidden * 4 * hidden + 4 * hidden) + (4 * hidden * hidden + hidden)  # c_fc, c_proj with biases
    norms = 2 * 2 * hidden  # ln_1, ln_2: weight and bias
    positions = seq_len * hidden
    return embeddings_and_head + positions + layers * (attention + mlp + norms) + 2 * hidden  # + ln_f


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_parameters(arch):
    # Prepare
    cfg = ModelConfig(arch=arch)

    # Execute
    a = build_model(cfg, vocab_size=VOCAB, seed=7)
    b = build_model(cfg, vocab_size=VOCAB, seed=7)

    # Assert
    _assert_same_state(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_different_seed_gives_different_parameters(arch):
    # Prepare
    cfg = ModelConfig(arch=arch)

    # Execute
    a = dict(build_model(cfg, vocab_size=VOCAB, seed=0).named_parameters())
    b = dict(build_model(cfg, vocab_size=VOCAB, seed=1).named_parameters())

    # Assert: every randomly initialized matrix differs (norm weights and biases start at constants)
    matrices = [name for name, p in a.items() if p.ndim == 2]
    assert matrices
    for name in matrices:
        assert not torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_equals_plain_torch_cross_entropy_of_the_shifted_logits(arch):
    # Prepare
    model = build_model(ModelConfig(arch=arch, seq_len=32), vocab_size=VOCAB, seed=0).eval()
    x = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(1))

    # Execute
    with torch.no_grad():
        out = model(input_ids=x, labels=x)

    # Assert
    assert out.logits.shape == (3, 32, VOCAB)
    reference = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, reference)
    # an untrained model over 256 ids is close to uniform: a loss near log(256), not 0 or inf
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_gives_the_expected_parameter_count(arch):
    # Prepare
    hidden, layers, _, inter = PRESETS["tiny"]
    cfg = ModelConfig(arch=arch, preset="tiny")

    # Execute
    n = count_parameters(build_model(cfg, vocab_size=VOCAB, seed=0))

    # Assert
    assert n == _expected_parameters(arch, hidden=hidden, layers=layers, inter=inter, seq_len=cfg.seq_len)


@pytest.mark.parametrize("arch", ARCHS)
def test_size_overrides_change_the_parameter_count_as_expected(arch):
    # Prepare
    _, _, _, inter = PRESETS["tiny"]
    cfg = ModelConfig(arch=arch, preset="tiny", hidden_size=32, num_layers=3)

    # Execute
    model = build_model(cfg, vocab_size=VOCAB, seed=0)

    # Assert
    assert count_parameters(model) == _expected_parameters(arch, hidden=32, layers=3, inter=inter, seq_len=cfg.seq_len)
    assert count_parameters(model) != count_parameters(build_model(ModelConfig(arch=arch), vocab_size=VOCAB, seed=0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("hidden", "heads"), [(66, None), (64, 5)])
def test_hidden_size_not_divisible_by_heads_raises_config_error(arch, hidden, heads):
    # Prepare
    cfg = ModelConfig(arch=arch, hidden_size=hidden, num_heads=heads)

    # Execute / Assert
    with pytest.raises(ConfigError, match="model.hidden_size"):
        build_model(cfg, vocab_size=VOCAB, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_loads_back_through_path_with_identical_weights(arch, tmp_path):
    # Prepare
    original = build_model(ModelConfig(arch=arch), vocab_size=VOCAB, seed=3)
    original.save_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))

    # Execute
    loaded = build_model(ModelConfig(path=str(tmp_path)), vocab_size=VOCAB, seed=99)  # the seed must not matter

    # Assert
    assert type(loaded) is type(original)
    _assert_same_state(loaded, original)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, original.eval()(input_ids=x).logits)


def test_path_without_config_json_raises_config_error(tmp_path):
    # Prepare
    (tmp_path / "model.safetensors").write_bytes(b"")

    # Execute / Assert
    with pytest.raises(ConfigError, match="config.json"):
        build_model(ModelConfig(path=str(tmp_path)), vocab_size=VOCAB, seed=0)
