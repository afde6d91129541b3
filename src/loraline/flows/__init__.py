"""Orchestration on top of the stages: the Prefect flow (`pipeline`), the DVC stage runner it uses
(`orchestrate`) and the in-process `dvc repro` (`repro`). Composition only: no stage logic here."""
