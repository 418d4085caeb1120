#!/usr/bin/env cwl-runner
# A GEMMA LOCO scan as CWL: for every chromosome its leave-one-out kinship, then the
# LMM of its markers with that kinship (a dotproduct scatter), as gemma-wrapper --loco
# runs it. Each invocation is one sheepdog piece.
cwlVersion: v1.2
class: Workflow
requirements:
  ScatterFeatureRequirement: {}
inputs:
  geno: File
  pheno: File
  anno: File
  chromosomes: string[]
  maf: {type: float, default: 0.1}
outputs:
  assoc:
    type: File[]
    outputSource: lmm/assoc
steps:
  kinship:
    run: gemma-loco-kinship.cwl
    scatter: chromosome
    in: {geno: geno, pheno: pheno, anno: anno, chromosome: chromosomes}
    out: [kinship]
  lmm:
    run: gemma-loco-lmm.cwl
    scatter: [chromosome, kinship]
    scatterMethod: dotproduct
    in: {geno: geno, pheno: pheno, anno: anno, chromosome: chromosomes,
         kinship: kinship/kinship, maf: maf}
    out: [assoc]
