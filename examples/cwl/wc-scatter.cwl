#!/usr/bin/env cwl-runner
# The word count of every text, one tool invocation (one sheepdog piece) per text, all
# at once on the workers that serve the queue; then their sum.
cwlVersion: v1.2
class: Workflow
requirements:
  ScatterFeatureRequirement: {}
  InlineJavascriptRequirement: {}
inputs:
  texts: File[]
outputs:
  counts:
    type: File[]
    outputSource: count/count
  total:
    type: File
    outputSource: sum/total
steps:
  count:
    run: wc-tool.cwl
    scatter: text
    in:
      text: texts
    out: [count]
  sum:
    run:
      class: CommandLineTool
      baseCommand: [awk, '{ s += $1 } END { print s }']
      inputs:
        counts:
          type: File[]
          inputBinding: {position: 1}
      stdout: total.txt
      outputs:
        total: {type: stdout}
    in:
      counts: count/count
    out: [total]
