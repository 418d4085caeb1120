#!/bin/sh
#SBATCH --job-name=${job_name}
# One sheepdog piece: ${piece}
# Written by sheepdog from this template (deploy/slurm/task.sh); edit it to change every
# piece's script, e.g. to add module loads. The piece's exit status is recorded in
# the piece's private control directory by the script itself: no accounting needed.
cd ${workdir} || exit 97
${setup}
${command}
code=$$?
echo $$code > ${control}/.sheepdog.exit.tmp && mv ${control}/.sheepdog.exit.tmp ${control}/.sheepdog.exit
exit $$code
