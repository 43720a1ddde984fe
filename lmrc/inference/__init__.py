"""Segment any video: `InferenceConfig` (`config.py`), `Segmenter` (streaming, one frame at a time,
`segmenter.py`), the inference fast path (`fast_path.py`), `segment_video` / `segment_sequence` (whole videos,
`run.py`), forward and backward propagation from masks on any frames (`propagate.py`), masks from a box, clicks
and strokes (`prompts.py`), mask and result files (`io.py`), `lmrc segment` (`command.py`). The public calls are re-exported by
the `lmrc` package itself."""
