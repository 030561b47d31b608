"""kernels/flashinfer_graph_prefill.py on CPU: how a step is padded to a whole-step graph's fixed sequences and rows
(FlashInfer's kernel in graph mode runs on the GPU: tests/engine/executor/test_gpu_executor.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pie_server.kernels.attention import AttentionStep
from pie_server.kernels.flashinfer_attention import build_host_metadata
from pie_server.kernels.flashinfer_graph_prefill import PADDING_PAGE, padded_layout

PAGE_SIZE = 4


def _step() -> AttentionStep:
    """A 6-token chunk over pages [3, 4] (context 7) beside a decode on page [9] (context 2): 7 tokens."""
    return AttentionStep(page_size=PAGE_SIZE, qo_indptr=[0, 6, 7], kv_page_indptr=[0, 2, 3], kv_page_ids=[3, 4, 9],
                         kv_last_page_lens=[3, 2], slot_ids=[13, 14, 15, 16, 17, 18, 37])


def _kv_lens(layout) -> np.ndarray:  # noqa: ANN001
    return (np.diff(layout.kv_page_indptr) - 1) * PAGE_SIZE + layout.kv_last_page_lens


def test_real_sequences_then_padding_rows_then_empty_sequences() -> None:
    layout = padded_layout(build_host_metadata(_step()), num_rows=16, num_seqs=5, page_size=PAGE_SIZE)
    assert layout.qo_indptr.tolist() == [0, 6, 7, 16, 16, 16]  # 9 padding rows, then two empty sequences
    assert layout.kv_page_indptr.tolist() == [0, 2, 3, 6, 7, 8]
    assert layout.kv_page_ids.tolist() == [3, 4, 9] + [PADDING_PAGE] * 5
    assert layout.kv_last_page_lens.tolist() == [3, 2, PAGE_SIZE, 1, 1]
    q_lens = np.diff(layout.qo_indptr)
    assert (q_lens <= _kv_lens(layout)).all()  # causal: every row of every sequence sees at least one slot
    assert all(a.dtype == np.int32 for a in (layout.qo_indptr, layout.kv_page_indptr, layout.kv_page_ids,
                                            layout.kv_last_page_lens))


def test_a_full_bucket_has_no_padding_sequence_and_the_capture_is_all_padding() -> None:
    layout = padded_layout(build_host_metadata(_step()), num_rows=7, num_seqs=3, page_size=PAGE_SIZE)
    assert layout.qo_indptr.tolist() == [0, 6, 7, 7]
    assert layout.kv_page_ids.tolist() == [3, 4, 9, PADDING_PAGE]
    capture = padded_layout(None, num_rows=16, num_seqs=4, page_size=PAGE_SIZE)
    assert capture.qo_indptr.tolist() == [0, 16, 16, 16, 16]
    assert _kv_lens(capture).tolist() == [16, 1, 1, 1]
    assert set(capture.kv_page_ids.tolist()) == {PADDING_PAGE}


@pytest.mark.parametrize("num_rows, num_seqs", [(6, 4), (16, 2), (7, 1)])
def test_steps_that_do_not_fit_are_refused(num_rows: int, num_seqs: int) -> None:
    """Too many tokens, or no sequence left for the padding rows, or too few sequences."""
    with pytest.raises(ValueError, match="do not fit"):
        padded_layout(build_host_metadata(_step()), num_rows=num_rows, num_seqs=num_seqs, page_size=PAGE_SIZE)
