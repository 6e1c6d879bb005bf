set terminal pngcairo size 900,560 font 'sans,11'
set output '.perplexity_extension.png.tmp'
set grid
set key outside right top
set logscale x 2
set logscale y
set xlabel 'evaluation context (tokens)'
set ylabel 'validation perplexity'
set arrow from 32, graph 0 to 32, graph 1 nohead dt 2 lc rgb 'gray'
set label 'training context' at 32, graph 0.97 offset 0.5,0 font ',9' tc rgb 'gray'
plot 'ppl_rope.dat' using 1:2 with linespoints lw 2 pt 7 title 'rope', \
     'ppl_rope_pi.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'rope + pi', \
     'ppl_rope_ntk.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'rope + ntk', \
     'ppl_rope_dynamic-ntk.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'rope + dynamic-ntk', \
     'ppl_rope_yarn.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'rope + yarn', \
     'ppl_grape-m.dat' using 1:2 with linespoints lw 2 pt 7 title 'grape-m', \
     'ppl_grape-m_pi.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'grape-m + pi', \
     'ppl_grape-m_ntk.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'grape-m + ntk', \
     'ppl_grape-m_dynamic-ntk.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'grape-m + dynamic-ntk', \
     'ppl_grape-m_yarn.dat' using 1:2 with linespoints lw 2 pt 7 dt 2 title 'grape-m + yarn'
