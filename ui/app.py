"""thali's Streamlit app: pick a domain, classify photos (and correct the answers), read the model card
and the corrections people sent.

Run with ``thali ui [--api URL]``, or ``streamlit run ui/app.py`` with ``THALI_API_URL`` set. It talks
to the REST API over HTTP only."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="thali", page_icon=":material/restaurant:", layout="wide")
pages = [
    st.Page(
        str(HERE / "pages" / "classify.py"), title="Classify", icon=":material/photo_camera:", default=True
    ),
    st.Page(str(HERE / "pages" / "model_card.py"), title="Model card", icon=":material/monitoring:"),
    st.Page(str(HERE / "pages" / "feedback.py"), title="Feedback", icon=":material/rate_review:"),
]
st.navigation(pages).run()
