"""The compiler passes of partc (installed as ``partc.passes``)."""
