"""Upload photos (or take one), see the top labels with their confidence, the "not sure" outcome, the
latency, and where the model looked; under each answer, "Not right?" sends the right class back when the
server keeps feedback. Uploads stay when the domain changes: each is asked again."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pandas as pd
import streamlit as st

from thali.core.images import accepted_formats, accepted_suffixes
from thali.ui.client import NONE_OF_THESE, ApiProblem
from thali.ui.shared import client, domain_switcher, preview

MAX_MB = 10

domain = domain_switcher()
st.title("Classify")
if domain is None:
    st.stop()
st.caption(domain.get("description") or "")
n_classes = len(domain["classes"])  # read here, where domain is known not to be None
chosen: dict[str, Any] = domain  # and for the functions below

uploads = st.session_state.setdefault("uploads", {})  # sha256 -> (name, bytes); kept across domains
left, right = st.columns([3, 2])
with left:
    files = st.file_uploader(
        "Photos",
        type=accepted_suffixes(),
        accept_multiple_files=True,
        help=f"{', '.join(accepted_formats())}; up to {MAX_MB} MB each",
    )
with right:
    photo = st.camera_input("Or take a photo", key="camera")
for item in [*(files or []), *([photo] if photo is not None else [])]:
    data = item.getvalue()
    uploads[hashlib.sha256(data).hexdigest()] = (item.name or "camera.jpg", data)

options = st.columns([1, 1, 2])
top_k = options[0].slider("Labels to show", 1, 10, min(5, n_classes), key="top_k")
explain = options[1].toggle(
    "Explain", key="explain", disabled=not domain.get("explain"), help="overlay where the model looked"
)
if options[2].button("Clear photos", disabled=not uploads):
    uploads.clear()
    st.rerun()

if not uploads:
    st.info(f"Add a photo to classify it with **{domain['display_name']}** ({n_classes} classes).")
    st.stop()


def send_correction(key: str, name: str, data: bytes) -> None:
    """The button's callback (before the rerun draws the page): send the chosen class once, keep what
    the server saved, or its message."""
    label = st.session_state.get(f"fb_label_{key}")
    if label is None:
        return
    note = (st.session_state.get(f"fb_note_{key}") or "").strip() or None
    try:
        record = api.feedback(chosen["domain"], name, data, label, note)
    except ApiProblem as problem:
        message = problem.message.rstrip(".")
        if problem.status in (401, 403):
            message += ": set THALI_FEEDBACK_KEY to this server's feedback key where the UI runs"
        st.session_state.setdefault("feedback_errors", {})[key] = f"Not saved: {message}."
        return
    st.session_state.setdefault("feedback_errors", {}).pop(key, None)
    st.session_state.setdefault("feedback_sent", {})[key] = record


def not_right(sha256: str, name: str, data: bytes) -> None:
    """Under an answer: "Not right?" with the domain's classes and "None of these", sent with one click.
    Kept per domain and photo, so a rerun shows what was saved instead of sending it again."""
    if not chosen.get("feedback"):
        return
    key = f"{chosen['domain']}_{sha256}"
    labels = {c["name"]: c["display_name"] for c in chosen["classes"]}
    labels[NONE_OF_THESE] = "None of these"
    record = st.session_state.get("feedback_sent", {}).get(key)
    if record is not None:
        saved = labels.get(record["label"], record["label"])
        said = record.get("answer_label")
        if record.get("agreed"):
            why = " The model said so too."
        elif said and record.get("answer_unknown"):
            why = f" The model was not sure (best guess {labels.get(said, said)})."
        elif said:
            why = f" The model had said {labels.get(said, said)}."
        else:
            why = ""
        st.success(f"Thanks — saved as **{saved}**.{why}")
        return
    error = st.session_state.get("feedback_errors", {}).get(key)
    with st.expander("Not right?", expanded=error is not None):
        choice = st.selectbox(
            "What it really shows",
            list(labels),
            index=None,
            format_func=lambda n: labels[n],
            placeholder="Pick the right class",
            key=f"fb_label_{key}",
        )
        st.text_input("Note (optional)", max_chars=500, key=f"fb_note_{key}")
        st.button(
            "Send correction",
            key=f"fb_send_{key}",
            disabled=choice is None,
            on_click=send_correction,
            args=(key, name, data),
            help="the photo and the class you picked go to this server's feedback store",
        )
        if error:
            st.error(error)


def show(sha256: str, name: str, data: bytes, answer: dict[str, Any]) -> None:
    image_col, result_col = st.columns([2, 3])
    top = answer["predictions"][0]
    with image_col:
        if explain and answer.get("heatmap_png"):
            st.image(
                base64.b64decode(answer["heatmap_png"]), caption=f"{name}: where the model looked", width=320
            )
        else:
            st.image(preview(data), caption=name, width=320)
    with result_col:
        if answer["unknown"] and answer.get("unknown_method") == "knn_residual":
            st.warning(
                f"Probably not one of the {n_classes} things this domain knows: the photo "
                "looks unlike every photo this model was trained on. Best guess: "
                f"**{top['display_name']}**, {100 * top['probability']:.0f} %."
            )
        elif answer["unknown"]:
            st.warning(
                f"Not sure: the best guess, **{top['display_name']}**, has only "
                f"{100 * top['probability']:.0f} % confidence, under this model's threshold of "
                f"{100 * answer['unknown_threshold']:.0f} %. "
                f"It may not be one of the {n_classes} things this domain knows."
            )
        else:
            st.success(f"**{top['display_name']}** · {100 * top['probability']:.1f} %")
        chart = pd.DataFrame(
            {
                "label": [p["display_name"] for p in answer["predictions"]],
                "confidence": [round(100 * p["probability"], 2) for p in answer["predictions"]],
            }
        )
        st.bar_chart(
            chart, x="label", y="confidence", horizontal=True, sort="-confidence", height=40 + 32 * len(chart)
        )
        timings = answer.get("timings_ms") or {}
        took = sum(v for v in timings.values() if isinstance(v, int | float))
        cached = " (from the cache)" if answer.get("cached") else ""
        st.caption(f"v{answer['version']} {answer['variant']} · {took:.0f} ms on the server{cached}")
        not_right(sha256, name, data)


api = client()
for sha256, (name, data) in list(uploads.items()):
    with st.container(border=True):
        if len(data) > MAX_MB * 1024 * 1024:
            st.error(f"{name}: {len(data) / 1e6:.1f} MB is over the {MAX_MB} MB limit; not sent.")
            continue
        try:
            answer = api.predict(domain["domain"], name, data, top_k, bool(explain))
        except ApiProblem as problem:
            if problem.status in (400, 415):
                st.error(f"{name}: not a picture the model can read ({problem.message}).")
            elif problem.status == 413:
                st.error(f"{name}: too large ({problem.message}).")
            elif problem.status in (404, 503):
                st.error(f"{domain['display_name']} is not available right now: {problem.message}")
            else:
                st.error(f"{name}: {problem.message}")
            continue
        show(sha256, name, data, answer)
