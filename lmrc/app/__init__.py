"""`lmrc app`: a local web page to segment a video from a box, clicks and strokes (server, sessions, engine)."""
