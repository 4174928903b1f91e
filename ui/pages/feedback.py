"""The corrections people sent for the selected domain, per class: how often the model was confirmed
(agreed) and how often it was corrected, and the photos with what the model had said, so a team sees
where the model fails. The next model trains on them (``thali feedback export``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pandas as pd
import streamlit as st

from thali.ui.client import NONE_OF_THESE, ApiProblem, Client
from thali.ui.shared import client, domain_switcher, preview

COUNTED = 1000  # the newest corrections counted per class (the API reads at most this many)
PHOTOS = 200  # the newest of them shown with their photos
PER_ROW = 6

domain = domain_switcher()
st.title("Feedback")
if domain is None:
    st.stop()
name = domain["domain"]
if not domain.get("feedback"):
    st.info(
        f"Feedback is off for **{domain['display_name']}**: this server keeps no corrections. Start "
        "`thali serve` with `THALI_FEEDBACK` set to a folder or an fsspec URL (`thali up` and `make run` "
        'turn it on in a local folder), and "Not right?" appears under every answer on the Classify page.'
    )
    st.stop()

api = client()
try:
    listing = api.feedback_list(name, limit=COUNTED)
except ApiProblem as problem:
    message = problem.message.rstrip(".")
    hint = ": set THALI_FEEDBACK_KEY where the UI runs" if problem.status in (401, 403) else ""
    st.error(f"The corrections could not be read: {message}{hint}.")
    st.stop()

labels = {c["name"]: c["display_name"] for c in domain["classes"]}
labels[NONE_OF_THESE] = "None of these"
counts: dict[str, dict[str, int]] = listing.get("counts") or {}
total = int(listing.get("total") or 0)
if not total:
    st.info(
        f'No corrections for **{domain["display_name"]}** yet. Classify a photo and use "Not right?" '
        "under the answer to send the class it really shows."
    )
    st.stop()

counted = int(listing.get("counted") or len(listing.get("records") or []))
agreed = sum(int(c.get("agreed", 0)) for c in counts.values())
corrected = sum(int(c.get("corrected", 0)) for c in counts.values())
cols = st.columns(3)
cols[0].metric("Photos sent", total)
cols[1].metric("Corrected", corrected, help="the person gave another class than the model's answer")
cols[2].metric("Agreed", agreed, help="the person confirmed the model's answer")

st.markdown("#### Per class")
if counted < total:
    st.caption(f"Counted over the newest {counted} of {total} corrections.")
order = [*labels, *sorted(set(counts) - set(labels))]  # the domain's classes, then labels it no longer has
rows = [
    {
        "class": labels.get(label, label),
        "corrected": int(counts.get(label, {}).get("corrected", 0)),
        "agreed": int(counts.get(label, {}).get("agreed", 0)),
    }
    for label in order
]
table = pd.DataFrame(rows)
table["sent"] = table["corrected"] + table["agreed"]
table = table[table["sent"] > 0].sort_values(["corrected", "sent"], ascending=False)
st.dataframe(table, hide_index=True, width="stretch")
st.caption(
    "The class is the one the person picked. Corrected: the model had answered another class; agreed: "
    "the person confirmed the model's answer."
)


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(base: str, domain_name: str, sha256: str) -> bytes:
    """A photo of the feedback store, fetched through the API once (a failure is not kept), small enough
    for a grid."""
    return preview(Client(base).feedback_photo(domain_name, sha256), box=320)


records: list[dict[str, Any]] = (listing.get("records") or [])[:PHOTOS]
shown = f"the newest {len(records)} of {total}" if len(records) < total else f"all {total}"
st.markdown("#### Photos")
st.caption(f"Showing {shown}, newest first, under the class the person picked.")
by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
for record in records:
    by_label[record["label"]].append(record)
for label in sorted(by_label, key=lambda k: -sum(not r.get("agreed") for r in by_label[k])):
    group = by_label[label]
    wrong = sum(not r.get("agreed") for r in group)
    with st.expander(f"{labels.get(label, label)} · {wrong} corrected, {len(group) - wrong} agreed", True):
        for start in range(0, len(group), PER_ROW):
            row = st.columns(PER_ROW)
            for cell, record in zip(row, group[start : start + PER_ROW], strict=False):
                said = record.get("answer_label")
                said_text = labels.get(said, said) if said else "?"
                if record.get("answer_unknown"):
                    said_text = f"not sure ({said_text}?)"
                caption = f"{'✓' if record.get('agreed') else '✗'} model said {said_text}"
                caption += f" · v{record.get('model_version', '?')} {record.get('variant') or ''}".rstrip()
                if record.get("note"):
                    caption += f" · “{record['note']}”"
                with cell:
                    try:
                        st.image(
                            thumbnail(api.base, name, record["image_sha256"]),
                            caption=caption,
                            width="stretch",
                        )
                    except ApiProblem as problem:
                        st.caption(f"photo {record['image_sha256'][:12]}…: {problem.message}")
                        st.caption(caption)
