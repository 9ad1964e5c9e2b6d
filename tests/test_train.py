"""make demo's training run (fusedformer.train): gpt-tiny on the fused ops of the cpu backend
and on the plain-PyTorch reference, from one initialization on one batch stream."""
from conftest import require_backend

from fusedformer.train import train_fused_and_reference


def test_fused_training_follows_the_reference(capsys):
    """fp32, 10 steps: the per-step train losses agree to 1e-5 (measured 4.8e-7 at 10 steps; the
    gap grows as the runs' roundings compound, 4.0e-5 at 30) and fall; both runs print."""
    require_backend("attention", "cpu", "cpu")
    fused, reference = train_fused_and_reference(steps=10, seed=0, backend="cpu", log_every=5)
    assert len(fused) == len(reference) == 10
    assert max(abs(a - b) for a, b in zip(fused, reference)) < 1e-5
    assert fused[-1] < fused[0] - 0.5
    out = capsys.readouterr().out
    assert "fused ops (backend cpu)" in out and "plain-PyTorch reference" in out
