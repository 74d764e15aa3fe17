"""Deliverables: what a campaign hands over.

Plain functions, each usable and tested alone: lossless hand-over files (``intermediate``),
upscaling (``resize``, ``realesrgan``), encoding with frame-rate conversion, audio and logo
(``encode``), previews, probing and verification, the content-safety gate, provenance and the
manifest. ``deliver.build_deliverables`` composes them; ``publish.publish_deliverables`` uploads
the verified result. Nothing here imports Prefect; ``tasks/deliver.py`` wraps it as a task.
"""
