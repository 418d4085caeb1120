#!/usr/bin/env cwl-runner
# GEMMA's kinship matrix leaving one chromosome out: gemma -gk -loco CHR.
cwlVersion: v1.2
class: CommandLineTool
baseCommand: [gemma, -gk]
inputs:
  geno: {type: File, inputBinding: {prefix: -g}}
  pheno: {type: File, inputBinding: {prefix: -p}}
  anno: {type: File, inputBinding: {prefix: -a}}
  chromosome: {type: string, inputBinding: {prefix: -loco}}
arguments: [-o, $(inputs.chromosome)]
outputs:
  kinship:
    type: File
    outputBinding: {glob: "output/$(inputs.chromosome).cXX.txt"}
