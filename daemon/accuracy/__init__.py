"""`codetr-stream eval`: COCO box AP of engines on a labelled image set, through the daemon's own
runner."""
