"""Core learning library: data, models, train, evaluate, export. Never imports Redis, RQ or Streamlit."""
