"""The Gradio UI: one module per tab, shared control groups (controls.py), the Generate handler
they share (generate.py), the cross-tab wiring and the API (app.py, api.py). It calls only the
Gradio-free service (studio.service) and builds requests through studio.engine.request."""
