"""Shared plumbing of the recipes, one concern a module; imports run one way, from the leaves up:

    errors, schedule, batching, lora_inits, data, conll  (leaves: data is the 🤗 Datasets layer, conll its CoNLL
                  reader)
    calibration   calibration batches for the data-aware inits           (lora_inits)
    methods       model, tokenizer and the PEFT method of --method       (errors, calibration)
    distill       a frozen teacher's soft targets                        (errors, methods)
    args          the shared flags and their checks                      (data, methods, distill, schedule, ...)
    checkpoint    checkpoints and the output folder                      (errors)
    accelerator   the Accelerator, its trackers and the seed             (checkpoint, errors)
    loop          the training loop: TrainState carried through resume, epochs, validation and the result
                                                                         (batching, checkpoint, methods, schedule)
    card          the model card                                         (distill)
    outputs       what a run leaves in --output_dir, and the closing steps (args, card, checkpoint, loop, methods)
    text_classification   what sentiment.py and intent.py share          (batching, data)

Each recipe (`ner.py`, `sentiment.py`, `intent.py`, `recommend.py`, `instruct.py`) imports what it uses from these
modules and keeps its task's own steps in its `main()`. `accelerate launch recipes/<task>.py` (and `python
recipes/<task>.py`) put the script's folder on `sys.path`, which is what makes `import common` work.
"""
