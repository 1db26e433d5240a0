"""What resuming says: an FSDP2 checkpoint directory given to the DDP engine names the engine that loads it, and an
unchanged layout with ``attention="auto"`` reports no difference (it used to report "attention: checkpoint
'ulysses', now 'auto'")."""

from __future__ import annotations

import pytest

from lightning_seqpar import SeqParStrategy
from lightning_seqpar.deepspeed_engine import layout_differences


def test_fsdp2_directory_on_the_ddp_engine_names_fsdp(tmp_path):
    (tmp_path / "lightning_state.pt").write_bytes(b"")
    strategy = SeqParStrategy()
    assert type(strategy).__name__ == "SeqParDDPStrategy"
    with pytest.raises(ValueError, match=r"checkpoint directory of the FSDP2 engine.*SeqParStrategy\(fsdp=True"):
        strategy.load_checkpoint(tmp_path)


def test_attention_auto_matches_the_kind_it_chose():
    saved = {"sequence_parallel_size": 2, "attention": "ulysses"}
    assert layout_differences(saved, {"sequence_parallel_size": 2, "attention": "auto"}) == []
    assert layout_differences(saved, {"sequence_parallel_size": 2, "attention": "lss"}) == [
        "attention: checkpoint 'ulysses', now 'lss'"
    ]
    assert layout_differences(saved, {"sequence_parallel_size": 4, "attention": "auto"}) == [
        "sequence_parallel_size: checkpoint 2, now 4"
    ]
