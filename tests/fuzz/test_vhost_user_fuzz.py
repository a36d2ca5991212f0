"""vhost-user decode and the handler state machine, with the fuzz budget.

The strategies and the property live in ``tests/unit/test_vhost_user_handler.py``
(random message sequences, real fds, a device that fails or raises; the
handler never raises, answers well-formed replies, leaks no fd); here the
same property runs with ``PYVIRTIOFSD_FUZZ_EXAMPLES`` examples, so that
``make fuzz`` gives it a long run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit import test_vhost_user_handler as unit

EXAMPLES = int(os.environ.get("PYVIRTIOFSD_FUZZ_EXAMPLES", "150"))
_sequences = unit.test_handler_never_raises_and_leaks_nothing.hypothesis.inner_test  # type: ignore[attr-defined]
_raw = unit.test_handler_on_raw_bytes.hypothesis.inner_test  # type: ignore[attr-defined]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    handshake=st.booleans(),
    batch=st.lists(unit.messages(), min_size=1, max_size=25),
    device_mode=st.sampled_from(["ok", "fail", "crash"]),
)
def test_handler_sequences(
    handshake: bool, batch: list[tuple[unit.Header, bytes, int, bool]], device_mode: str
) -> None:
    _sequences(handshake=handshake, batch=batch, device_mode=device_mode)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(min_size=unit.HEADER_SIZE, max_size=400))
def test_handler_raw_bytes(data: bytes) -> None:
    _raw(data=data)
