"""The prepare stage: raw tenant files to a clean, deduplicated, split, chat-templated dataset."""

from loraline.data.prepare import CHAT_FEATURES, DOCUMENT_FEATURES, PrepareResult, collect, prepare_tenant
from loraline.data.schema import ChatTemplateError, PrepareError, PrepareStats, Record, Reject, RejectReason

__all__ = [
    "CHAT_FEATURES",
    "DOCUMENT_FEATURES",
    "ChatTemplateError",
    "PrepareError",
    "PrepareResult",
    "PrepareStats",
    "Record",
    "Reject",
    "RejectReason",
    "collect",
    "prepare_tenant",
]
