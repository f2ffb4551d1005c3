"""Domain identifiers, named once."""

from __future__ import annotations

from typing import Any, NewType

__all__ = ["AssayId", "CampaignId", "CompoundId", "Record", "ReadingId", "RequestId", "Smiles"]

CampaignId = NewType("CampaignId", str)
CompoundId = NewType("CompoundId", str)
AssayId = NewType("AssayId", str)
ReadingId = NewType("ReadingId", str)
RequestId = NewType("RequestId", str)
Smiles = NewType("Smiles", str)
#: A decoded Avro record: field name -> value; timestamps are epoch milliseconds.
Record = dict[str, Any]
