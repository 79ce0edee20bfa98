"""An example Django project whose uploads are stored in MogileFS and served by the middleware."""
