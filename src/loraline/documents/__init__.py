"""The `documents` stage: each tenant's plain documents, collected for base pretraining and synthesis."""

from loraline.documents.stage import DOCUMENT_SUFFIXES, DocumentsResult, collect_documents, run

__all__ = ["DOCUMENT_SUFFIXES", "DocumentsResult", "collect_documents", "run"]
