"""Generated from proto/hvplace.proto; do not edit."""
