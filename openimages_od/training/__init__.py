"""TF Model Garden RetinaNet: train, evaluate (COCO + Open Images mAP), export."""
