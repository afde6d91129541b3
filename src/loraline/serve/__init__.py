"""Serving every tenant's production adapter on one shared base through vLLM (issue 15)."""
