#!/bin/bash
# Long test speech for the live runs: held-out espeak-ng voices, sentences not in the corpus, short pauses.
# usage: docs/live/make_speech.sh OUT.wav SECONDS     (16 kHz mono; needs espeak-ng, sox, bc)
set -euo pipefail
out=$(realpath "$1"); secs=$2; tmp=$(mktemp -d); cd "$tmp"
texts=("Good morning everyone, thank you for joining the call today." "Let me share a few numbers from last quarter before we start." "Sales grew in every region, and the new store opened on time." "We still have work to do on delivery times, which are too long." "Our team will visit the two largest customers next month." "Please send your questions in the chat, and I will answer them at the end." "The weather was terrible, but the trucks kept moving." "Next, I would like to talk about hiring and training." "We plan to add six engineers and two designers this spring." "Finally, a big thank you to everyone who worked late last week.")
voices=("en-us+f3" "en-gb-scotland+m7" "en-us+m2" "en-gb+f4")
total=0; i=0; parts=()
while [ "$(echo "$total < $secs" | bc)" -eq 1 ]; do
  espeak-ng -v "${voices[$((i % ${#voices[@]}))]}" -s $((140 + (i * 7) % 40)) -w p_$i.wav "${texts[$((i % ${#texts[@]}))]}"
  sox p_$i.wav -r 16000 -c 1 q_$i.wav pad 0 0.$((3 + (i * 3) % 7)) 2>/dev/null
  parts+=(q_$i.wav); total=$(echo "$total + $(soxi -D q_$i.wav)" | bc); i=$((i + 1))
done
sox "${parts[@]}" "$out" trim 0 "$secs"
rm -rf "$tmp"
