"""The model card of the served version: metrics per variant, per-class accuracy, the confusion matrix,
data and licence, lineage."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st
from pydantic import ValidationError

from thali.core.manifest import Manifest
from thali.ui.client import ApiProblem
from thali.ui.shared import client, domain_switcher, load_card

domain = domain_switcher()
st.title("Model card")
if domain is None:
    st.stop()
try:
    served = load_card(client().base, domain["domain"], domain["version"])
except ApiProblem as problem:
    st.error(problem.message)
    st.stop()
try:  # the API answers the package's manifest; read it through the one typed model
    card = Manifest.model_validate(served["card"])
except ValidationError as exc:
    st.error(f"The server's model card is not a thali manifest: {exc.errors()[0]['msg']}")
    st.stop()
st.subheader(f"{domain['display_name']} · v{served['version']}")
st.caption(domain.get("description") or "")
cols = st.columns(4)
cols[0].metric("Version", f"v{served['version']}", help=f"asked for: {domain['ref']}")
cols[1].metric("Variant served", served["variant"])
cols[2].metric("Backend", served["backend"])
cols[3].metric("Runs on", served["provider"].replace("ExecutionProvider", ""))

st.markdown("#### Accuracy per variant (validation split)")
rows = []
for name, m in card.variants.items():
    rows.append(
        {
            "variant": name,
            "file": m.file,
            "top-1 %": round(100 * (m.top1 or 0), 2),
            "top-5 %": round(100 * (m.top5 or 0), 2),
            "ECE": round(m.ece or 0, 4),
            "size MB": round((m.size_bytes or 0) / 1e6, 2),
            "gate": "reference" if name == "fp32" else ("passed" if m.gate and m.gate.passed else "failed"),
        }
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
for name, reasons in card.rejected_variants.items():
    st.caption(f"{name} was not published: {'; '.join(reasons)}")

served_variant = card.variants.get(served["variant"])
per_class = served_variant.per_class if served_variant else {}
left, right = st.columns(2)
with left:
    st.markdown(f"#### Accuracy per class ({served['variant']})")
    if per_class:
        names = {c["name"]: c["display_name"] for c in served["classes"]}
        frame = pd.DataFrame(
            [
                {
                    "class": names.get(k, k),
                    "accuracy %": round(100 * (v.recall or 0), 1),
                    "images": v.support,
                }
                for k, v in per_class.items()
            ]
        ).sort_values("accuracy %")
        st.bar_chart(
            frame, x="class", y="accuracy %", horizontal=True, sort="accuracy %", height=60 + 22 * len(frame)
        )
    else:
        st.info("This card has no per-class figures.")
with right:
    st.markdown("#### Confusion matrix")
    matrix = served_variant.confusion_matrix if served_variant else None
    if matrix:
        labels = [c["display_name"] for c in served["classes"]]
        cells = pd.DataFrame(
            [
                {"true": labels[i], "predicted": labels[j], "images": int(v)}
                for i, row in enumerate(matrix)
                for j, v in enumerate(row)
            ]
        )
        heat = (
            alt.Chart(cells)
            .mark_rect()
            .encode(
                x=alt.X("predicted:N", sort=labels),
                y=alt.Y("true:N", sort=labels),
                color=alt.Color("images:Q", scale=alt.Scale(scheme="orangered")),
                tooltip=["true", "predicted", "images"],
            )
            .properties(height=max(240, 18 * len(labels)))
        )
        st.altair_chart(heat, width="stretch")
    else:
        st.info("This card has no confusion matrix (published before thali recorded it).")

dataset, lineage = card.dataset, card.lineage
st.markdown("#### Data and licence")
st.write(
    f"Validation images: {dataset.validation_images or '?'} · fingerprint "
    f"`{str(dataset.fingerprint or '?')[:16]}…`"
)
st.info(f"Licence: {card.licence}")
st.markdown("#### Lineage")
st.json(
    {
        "published": card.published_at,
        "thali": card.thali_version,
        "run": lineage.run_id,
        "checkpoint sha256": lineage.checkpoint_sha256,
        "exported": lineage.exported_at,
        "signed by": domain.get("signed_by") or "unsigned",
    },
    expanded=False,
)
