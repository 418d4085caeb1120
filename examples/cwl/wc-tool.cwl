#!/usr/bin/env cwl-runner
# One text's word count: `wc -w < TEXT` into count.txt.
cwlVersion: v1.2
class: CommandLineTool
baseCommand: [wc, -w]
inputs:
  text:
    type: File
stdin: $(inputs.text.path)
stdout: count.txt
outputs:
  count:
    type: stdout
