"""The Streamlit UI: talks to the API over HTTP only, never imports torch."""
