#!/usr/bin/env cwl-runner
# GEMMA's linear mixed model on one chromosome's markers, with the kinship that leaves
# that chromosome out: gemma -lmm 9 -maf MAF -loco CHR -k K.
cwlVersion: v1.2
class: CommandLineTool
baseCommand: [gemma, -lmm, "9"]
inputs:
  geno: {type: File, inputBinding: {prefix: -g}}
  pheno: {type: File, inputBinding: {prefix: -p}}
  anno: {type: File, inputBinding: {prefix: -a}}
  kinship: {type: File, inputBinding: {prefix: -k}}
  chromosome: {type: string, inputBinding: {prefix: -loco}}
  maf: {type: float, default: 0.1, inputBinding: {prefix: -maf}}
arguments: [-o, $(inputs.chromosome)]
outputs:
  assoc:
    type: File
    outputBinding: {glob: "output/$(inputs.chromosome).assoc.txt"}
